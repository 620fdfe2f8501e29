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
    metric = SegmentationMetric(vocabulary.num_classes + 1, class_names=["background", *vocabulary.names])
    for image, mask, present in samples:
        names = [vocabulary.names[i] for i in present]
        if not names:
            metric.update(np.zeros_like(mask), mask)
            continue
        result = predictor.set_image(image).predict(names, vocabulary=vocabulary)
        metric.update(result.pseudo_label, mask)
    return metric.compute()
