"""Optimiser and learning-rate schedule of ExCEL training (EXCEL_SPEC §5.3).

* :func:`param_groups` — the reference's four AdamW parameter groups: groups 0–1 at the base lr (the CLIP
  backbone's groups; empty, CLIP is frozen), groups 2–3 at ``heads_lr_mult × lr`` (group 3 holds the decoder and
  then the adapter parameters; group 2 is empty). Weight decay 0.01 on every parameter.
* :func:`lr_multiplier` — warm-up ``1 − (1 − s/W)(1 − ratio)`` while ``s < W``, then poly ``(1 − s/max)^power``
  (not shifted by the warm-up), with ``s`` the number of optimiser steps already taken.
* :func:`build_optimizer` — ``torch.optim.AdamW`` over those groups; :func:`set_lrs` applies the multiplier before
  each step (the schedule's only state is ``s``, the trainer's iteration counter, so a resumed run continues it).

The reference logs group 0's lr: 9.934e-05 at VOC iteration 200 (``s = 199``), 9.950e-05 at COCO iteration 200.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import TrainConfig

__all__ = ["GROUP_NAMES", "base_lrs", "build_optimizer", "group_lrs", "lr_multiplier", "param_groups", "set_lrs"]

GROUP_NAMES = ("backbone", "backbone_norm", "heads_norm", "heads")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """lr multiplier for the optimiser step taken after ``step`` earlier steps (EXCEL_SPEC §5.3)."""
    s = int(step)
    if s < cfg.warmup_iters:
        return 1.0 - (1.0 - s / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    return max(0.0, 1.0 - s / cfg.iterations) ** cfg.poly_power


def base_lrs(cfg: TrainConfig) -> tuple[float, float, float, float]:
    """Base lr of the four reference groups."""
    heads = cfg.lr * cfg.heads_lr_mult
    return cfg.lr, cfg.lr, heads, heads


def group_lrs(step: int, cfg: TrainConfig) -> tuple[float, ...]:
    """lr of each of the four groups during optimiser step ``step`` (0-based)."""
    m = lr_multiplier(step, cfg)
    return tuple(b * m for b in base_lrs(cfg))


def param_groups(heads: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The reference's parameter groups for the trainable heads (decoder first, then adapter, in group 3)."""
    decoder = list(heads.decoder.parameters())
    adapter = list(heads.adapter.parameters())
    params: Sequence[list] = ([], [], [], [p for p in decoder + adapter if p.requires_grad])
    return [{"params": ps, "lr": lr, "name": name, "weight_decay": cfg.weight_decay}
            for ps, lr, name in zip(params, base_lrs(cfg), GROUP_NAMES)]


def build_optimizer(heads: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (betas, eps, decoupled weight decay of ``cfg``); call :func:`set_lrs`
    before every ``step``."""
    return torch.optim.AdamW(param_groups(heads, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def set_lrs(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every group's lr for optimiser step ``step`` (0-based, = steps already taken) as the reference's
    ``PolyWarmupAdamW.step`` does; returns group 0's lr (the value the reference logs)."""
    m = lr_multiplier(step, cfg)
    for group, base in zip(optimizer.param_groups, base_lrs(cfg)):
        group["lr"] = base * m
    return optimizer.param_groups[0]["lr"]
