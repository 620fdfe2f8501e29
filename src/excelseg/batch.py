"""Batch pseudo-labelling of a prepared dataset: the library part of ``excelseg pseudo-label``.

The per-image work is :meth:`excelseg.predictor.CamPredictor.predict_state` unchanged (paper protocol, EXCEL_SPEC
§6 ``infer_lam``: every image gets the CAMs and label of the classes in its image-level label, aligned against the
dataset's whole vocabulary). This module adds what a run over 10⁴–10⁵ images needs:

* :class:`Shard`: a disjoint, deterministic slice ``sorted(ids)[rank::world]`` for one of ``world`` processes
  (``--shard i/n`` or torchrun's ``RANK`` / ``WORLD_SIZE``); no process group is needed (embarrassingly parallel).
* resume and outputs: :mod:`excelseg.outputs` (``is_done``, ``stale_temps_of``, the CAM archive format).
* :func:`iter_pseudo_labels`: images decoded by a ``DataLoader`` (``workers`` processes, or one thread ahead with
  ``overlap``: :func:`prefetch`), backbone forwards in
  batches of ``batch_size`` (the network input has a fixed size, so images of any size batch), per-image
  :class:`LabelOutput`; unreadable images come back as errors, not exceptions.
* optional dense CRF (:mod:`excelseg.crf`) on the ``[bg, cams]`` scores after PAR, at the full image size.
* CAM archives: :func:`excelseg.outputs.cam_archive`, one format for every command.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from .crf import CrfConfig, dense_crf
from .predictor import CamPredictor, CamResult
from .vocab import Vocabulary, normalize_name

__all__ = ["LabelOutput", "Shard", "dataset_vocabulary", "iter_pseudo_labels", "prefetch"]

_END = object()


# ---- sharding ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world``: takes ``sorted(ids)[rank::world]``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {self.rank}/{self.world}")

    def select(self, ids: Sequence[str]) -> list[str]:
        """This shard's ids: every ``world``-th of the sorted ids, from ``rank``. The shards of one ``world``
        are disjoint and together hold every id once."""
        return sorted(ids)[self.rank::self.world]

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` → ``Shard(i, n)``."""
        try:
            rank, world = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must be i/n (e.g. 0/4), got {text!r}") from None
        return cls(rank, world)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard | None:
        """The shard torchrun (or any launcher) describes with ``RANK`` and ``WORLD_SIZE``; ``None`` if unset."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return None
        try:
            world = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
        except ValueError:
            raise ValueError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env['WORLD_SIZE']!r} are not integers") \
                from None
        return cls(rank, world)


# ---- vocabulary ------------------------------------------------------------------------------------------


def dataset_vocabulary(class_names: Sequence[str], kind: str) -> Vocabulary:
    """The vocabulary for a dataset's classes: the named ``voc`` / ``coco`` vocabulary (its prompt names and
    background words) when the classes are exactly that dataset's, in order; generated scenes (``kind``
    ``synthetic``): :func:`~excelseg.synthetic.synthetic_vocabulary` (their backgrounds as background words); else
    the names themselves with the paper's background words."""
    if kind == "synthetic":
        from .synthetic import synthetic_vocabulary

        vocab = synthetic_vocabulary()
        if list(vocab.names) == list(class_names):
            return vocab
    for key in ("voc", "coco"):
        named = Vocabulary.named(key)
        if [normalize_name(n) for n in class_names] == [normalize_name(n) for n in named.names]:
            return named
    return Vocabulary.from_names(list(class_names))


# ---- the batch loop --------------------------------------------------------------------------------------


class _ImageSource(torch.utils.data.Dataset):
    """``names`` of a dataset as ``{"name", "image" (H, W, 3) uint8 or None, "error" str or None}``."""

    def __init__(self, dataset: Any, names: Sequence[str]):
        self.dataset = dataset
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        try:
            return {"name": name, "image": self.dataset.load_image(name), "error": None}
        except Exception as exc:  # noqa: BLE001 (reported per image; one bad file must not stop a run)
            text = " ".join(str(exc).split()) or type(exc).__name__
            return {"name": name, "image": None, "error": text}


def _as_list(batch: list) -> list:
    return batch


@dataclass
class LabelOutput:
    """One image of :func:`iter_pseudo_labels`: ``label`` (H, W) uint8 and ``result`` (``None`` with ``error``)."""

    name: str
    label: np.ndarray | None = None
    result: CamResult | None = None
    error: str | None = None


def _crf_label(state, result: CamResult, rgb: np.ndarray, crf: CrfConfig) -> np.ndarray:
    """Dense CRF on the ``[bg, cams]`` scores of ``result`` after PAR (the maps whose argmax is the pseudo-label),
    normalised to sum to 1 per pixel, at the full image size; argmax → label values."""
    values = [0, *result.class_ids]
    scores = result.scores
    if tuple(scores.shape[1:]) != tuple(state.size):
        scores = F.interpolate(scores[None], size=tuple(state.size), mode="bilinear", align_corners=False)[0]
    scores = scores.float().clamp_min(0)
    probs = scores / scores.sum(dim=0, keepdim=True).clamp_min(1e-7)
    q = dense_crf(rgb, probs.cpu().numpy(), crf)
    return np.asarray(values, dtype=np.uint8)[q.argmax(axis=0)]


def prefetch(items: Iterable[Any]) -> Iterator[Any]:
    """``items``, produced one ahead by a background thread (exceptions are re-raised here, in order). Closing
    the iterator early stops the thread after the item it is producing."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_END, None))
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            q.put((_END, exc))

    thread = threading.Thread(target=produce, name="excelseg-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on the full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


def iter_pseudo_labels(
    predictor: CamPredictor,
    dataset: Any,
    names: Sequence[str],
    classes_of: Callable[[str], Sequence[str] | None],
    *,
    batch_size: int = 1,
    workers: int = 0,
    crf: CrfConfig | None = None,
    overlap: bool = False,
) -> Iterator[LabelOutput]:
    """Pseudo-labels of ``names`` (in order), one :class:`LabelOutput` per image.

    Args:
        predictor: the training-free predictor; its vocabulary is the one the CAMs are aligned against.
        dataset: anything with ``load_image(name) -> (H, W, 3) uint8`` (a :class:`~excelseg.data.SegDataset`).
        classes_of: the present class names of an image; ``None`` → every vocabulary class; ``[]`` → an
            all-background label (no class to look for).
        batch_size: images per backbone forward.
        workers: ``DataLoader`` processes decoding images (0: in this process).
        crf: dense CRF parameters (:data:`excelseg.crf.REFERENCE_CRF`) to post-process the labels; ``None``: off.
        overlap: with ``workers`` 0, decode the next batch in a background thread (:func:`prefetch`) while this
            one runs the forward (worker processes already decode ahead).
    """
    loader = torch.utils.data.DataLoader(_ImageSource(dataset, names), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_as_list)
    cfg = predictor.config.cam
    grid = predictor.encoder.grid_for(tuple(cfg.size))
    for batch in (prefetch(loader) if overlap and workers == 0 else loader):
        ready = []
        for item in batch:
            if item["error"] is not None:
                yield LabelOutput(item["name"], error=item["error"])
                continue
            classes = classes_of(item["name"])
            if classes is not None and len(classes) == 0:  # K = 0: what predict_state's PAR/argmax would give
                h, w = item["image"].shape[:2]
                empty = CamResult([], [], (h, w), np.zeros((h, w), np.uint8), torch.zeros(0, *grid),
                                  np.zeros((0, *grid), np.float32), torch.ones(1, *grid))
                yield LabelOutput(item["name"], empty.pseudo_label, empty)
                continue
            ready.append((item, classes))
        if not ready:
            continue
        states = predictor.encode_batch([item["image"] for item, _ in ready])
        for (item, classes), state in zip(ready, states):
            result = predictor.predict_state(state, None if classes is None else list(classes))
            label = result.pseudo_label
            if crf is not None and result.class_ids:
                label = _crf_label(state, result, item["image"], crf)
            yield LabelOutput(item["name"], label, result)
