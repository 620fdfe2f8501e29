"""Pseudo-labels of decoded batches: the per-image work of ``cam`` and ``pseudo-label`` (paper protocol,
EXCEL_SPEC §6 ``infer_lam``).

Every image gets the CAMs and label of its classes (``classes_of``), aligned against the predictor's whole
vocabulary: :meth:`excelseg.predictor.CamPredictor.predict_state` unchanged, after one batched backbone forward
(the network input has a fixed size, so images of any size batch). Optional dense CRF (:mod:`excelseg.crf`) on
the ``[bg, cams]`` scores after PAR, at the full image size. :func:`iter_pseudo_labels` is the whole loop over a
dataset in one call (decoding: :func:`excelseg.jobs.runner.decode`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..crf import CrfConfig, dense_crf
from ..predictor import CamPredictor, CamResult
from .runner import decode

__all__ = ["LabelOutput", "crf_label", "iter_pseudo_labels", "label_batch"]


@dataclass
class LabelOutput:
    """One image: ``label`` (H, W) uint8 and ``result`` (``None`` with ``error``)."""

    name: str
    label: np.ndarray | None = None
    result: CamResult | None = None
    error: str | None = None


def crf_label(state, result: CamResult, rgb: np.ndarray, crf: CrfConfig) -> np.ndarray:
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


def label_batch(predictor: CamPredictor, batch: Sequence[tuple[Any, str, np.ndarray]],
                classes_of: Callable[[Any], Sequence[str] | None], crf: CrfConfig | None = None
                ) -> Iterator[LabelOutput]:
    """One :class:`LabelOutput` (named by the stem) per image of ``batch`` ``[(key, stem, rgb)]``, in order.

    Args:
        predictor: the training-free predictor; its vocabulary is the one the CAMs are aligned against.
        classes_of: the present class names of an image (by key); ``None`` → every vocabulary class; ``[]`` → an
            all-background label (no class to look for).
        crf: dense CRF parameters (:data:`excelseg.crf.REFERENCE_CRF`) to post-process the labels; ``None``: off.
    """
    classes = [classes_of(key) for key, _, _ in batch]
    look = [i for i, c in enumerate(classes) if c is None or len(c) > 0]
    states = dict(zip(look, predictor.encode_batch([batch[i][2] for i in look]))) if look else {}
    grid = predictor.encoder.grid_for(tuple(predictor.config.cam.size))
    for i, (_, stem, rgb) in enumerate(batch):
        if i not in states:  # K = 0: what predict_state's PAR/argmax would give
            h, w = rgb.shape[:2]
            empty = CamResult([], [], (h, w), np.zeros((h, w), np.uint8), torch.zeros(0, *grid),
                              np.zeros((0, *grid), np.float32), torch.ones(1, *grid))
            yield LabelOutput(stem, empty.pseudo_label, empty)
            continue
        result = predictor.predict_state(states[i], None if classes[i] is None else list(classes[i]))
        label = result.pseudo_label
        if crf is not None and result.class_ids:
            label = crf_label(states[i], result, rgb, crf)
        yield LabelOutput(stem, label, result)


def iter_pseudo_labels(predictor: CamPredictor, dataset: Any, names: Sequence[str],
                       classes_of: Callable[[str], Sequence[str] | None], *, batch_size: int = 1, workers: int = 0,
                       crf: CrfConfig | None = None, overlap: bool = False) -> Iterator[LabelOutput]:
    """Pseudo-labels of a dataset's ``names`` (in order), one :class:`LabelOutput` per image; unreadable images
    come back with ``error``. ``dataset`` has ``load_image(name) -> (H, W, 3) uint8``; decoding as
    :func:`~excelseg.jobs.runner.decode`; the rest as :func:`label_batch`."""
    for batch in decode([(n, n) for n in names], batch_size, load=dataset.load_image, workers=workers,
                        overlap=overlap):
        for name, _, _, error in batch:
            if error is not None:
                yield LabelOutput(name, error=error)
        yield from label_batch(predictor, [(k, s, rgb) for k, s, rgb, e in batch if e is None], classes_of, crf)
