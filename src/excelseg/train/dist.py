"""Processes of a run: THE one reader of the launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun sets
them), the process group of training, and the collectives the trainer needs.

:func:`launched` reads the environment; :class:`DistInfo` is this process's place; :func:`device_for_rank` picks
its GPU. Per-image jobs shard by the same variables without a process group (:class:`excelseg.jobs.runner.Shard`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

__all__ = ["DistInfo", "all_max", "device_for_rank", "init_distributed", "launched"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> DistInfo:
        """``torchrun``'s RANK / WORLD_SIZE / LOCAL_RANK (single process without them)."""
        return launched(environ) or DistInfo()


def launched(environ: Mapping[str, str] | None = None) -> DistInfo | None:
    """The process a launcher describes with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``os.environ`` by
    default); ``None`` when ``WORLD_SIZE`` is unset. Non-integers are a ``ValueError`` naming them."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        return DistInfo(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ValueError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env['WORLD_SIZE']!r} / "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r} are not integers") from None


def device_for_rank(device: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--device`` for this process: under a launcher that sets ``LOCAL_RANK`` (torchrun), ``auto``/``cuda``
    become ``cuda:LOCAL_RANK`` when CUDA is available; anything else is returned unchanged."""
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK")
    if local is None or str(device or "auto") not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % max(1, torch.cuda.device_count())}"


def init_distributed(dist: DistInfo, device: torch.device) -> None:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on CPU) when there is more than one process."""
    if dist.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def all_max(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over the processes (a collective: every rank calls it; one process: unchanged)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()
