"""CAM-seed quality the way the paper reports seeds: pseudo-labels computed with the image-level labels, scored
with mIoU against the pixel ground truth (EXCEL_SPEC §6; paper Table 1 "seed" numbers).

Used by ``excelseg demo`` on synthetic scenes, by ``benchmarks/synthetic_ablation.py`` and by the regression test
of the shipped synthetic CLIP.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..metrics import SegmentationMetric
from ..predictor import CamPredictor
from ..vocab import Vocabulary


def seed_miou(predictor: CamPredictor, samples: Iterable[tuple[np.ndarray, np.ndarray, Iterable[int]]],
              vocabulary: Vocabulary) -> dict:
    """Score training-free seeds.

    Args:
        predictor: the pipeline to evaluate (its config decides SVC, TSE, refinement).
        samples: (image H×W×3 uint8, mask H×W uint8 with 0 = background and i + 1 = vocabulary class i,
            present class indices) triples.
        vocabulary: the classes, in mask order.
    Returns:
        :meth:`SegmentationMetric.compute` of all samples pooled (``miou`` over classes present in the GT).
    """
    metric = _metric(vocabulary)
    for image, mask, present in samples:
        names = [vocabulary.names[i] for i in present]
        if not names:
            metric.update(np.zeros_like(mask), mask)
            continue
        result = predictor.set_image(image).predict(names, vocabulary=vocabulary)
        metric.update(result.pseudo_label, mask)
    return metric.compute()


def _metric(vocabulary: Vocabulary) -> SegmentationMetric:
    return SegmentationMetric(vocabulary.num_classes + 1, class_names=["background", *vocabulary.names])


def pseudo_label_miou(model, samples: Iterable[tuple[np.ndarray, np.ndarray, Iterable[int]]],
                      vocabulary: Vocabulary, *, lvc: bool, box_threshold: float | None = None) -> dict:
    """Score the pseudo-labels a trained :class:`~excelseg.model.ExcelModel` makes for its own training.

    ``lvc=False``: static SVC CAMs refined with the attention affinity (the training-free seeds as the trainer
    computes them before ``lvc_switch_iter``); ``lvc=True``: LVC CAMs (the adapter's shift, paper §3.3 / Eq. 9)
    refined with the P-guided affinity — the labels the heads learn from after the switch. The one pseudo-label
    path (:meth:`~excelseg.model.ExcelModel.labels_from_output`) with the validation's steps (image resized to
    ``cam.size``, one forward, PAR on that input, labels at the mask size); ``box_threshold`` default
    ``heads.val_box_threshold``.

    Args:
        model: the model (heads loaded; evaluated in eval mode).
        samples: (image H×W×3 uint8, mask H×W uint8, present class indices) triples.
    Returns:
        :meth:`SegmentationMetric.compute` of all samples pooled.
    """
    import torch

    from ..preprocess import network_input

    cfg = model.config
    tau = cfg.heads.val_box_threshold if box_threshold is None else box_threshold
    metric = _metric(vocabulary)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for image, mask, present in samples:
            x = network_input(image, tuple(cfg.cam.size), cfg.cam.normalization)[None].to(model.device)
            label = torch.zeros(1, vocabulary.num_classes, device=model.device)
            label[0, list(present)] = 1.0
            pseudo = model.labels_from_output(model(x), x, label, tuple(mask.shape), lvc=lvc, guided=lvc,
                                              box_threshold=tau)[0]
            metric.update(pseudo.cpu().numpy(), mask)
    model.train(was_training)
    return metric.compute()


def segmenter_miou(segmenter, samples: Iterable[tuple[np.ndarray, np.ndarray, Iterable[int]]],
                   vocabulary: Vocabulary) -> dict:
    """Score a trained :class:`~excelseg.segmenter.Segmenter` (decoder predictions, no image-level labels used;
    multi-scale as its ``segment`` settings say) — the paper's "segmentation" numbers (Table 3)."""
    metric = _metric(vocabulary)
    for image, mask, _ in samples:
        metric.update(segmenter.predict(image).label, mask)
    return metric.compute()
