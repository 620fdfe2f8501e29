"""The synthetic world: procedural scenes with exact masks, their knowledge base, a small CLIP trained on them and
seed metrics — the offline, end-to-end quality loop of excelseg (no real weights or datasets needed).

``scenes``      classes from shared attributes, :class:`SceneGenerator` (images, masks, labels, captions)
``knowledge``   the classes' knowledge base (from the tables in ``sentences.json``) and its TSE bank
``dataset``     scenes written to disk (``python -m excelseg.synthetic OUT N``) and held-out evaluation samples
``captions``    caption variety and hard negatives for ``train-clip``
``clip_train``  ``excelseg train-clip``: the small CLIP shipped as ``--clip synthetic`` (imported on demand)
``seeds``       CAM-seed, pseudo-label and segmenter mIoU on scenes (imported on demand: it needs torch)
``trained``     the heads trained on scenes by ``excelseg train --config synthetic`` and shipped (on demand)
"""

from __future__ import annotations

from .dataset import HELD_OUT_SEED, held_out_samples, synthetic_vocabulary, write_dataset
from .knowledge import SYNTHETIC_CLUSTERS, knowledge_base, sentence_tables, synthetic_bank
from .scenes import (
                     BACKGROUNDS,
                     CLASS_NAMES,
                     CLASSES,
                     COLOURS,
                     MIN_VISIBLE_FRACTION,
                     MIN_VISIBLE_IMAGE_FRACTION,
                     PATTERNS,
                     SHAPE_AREA,
                     SHAPES,
                     SIZES,
                     ClassSpec,
                     PlacedObject,
                     Scene,
                     SceneGenerator,
                     caption_phrase,
                     shape_test,
)

__all__ = [
    "BACKGROUNDS", "CLASSES", "CLASS_NAMES", "COLOURS", "HELD_OUT_SEED", "MIN_VISIBLE_FRACTION",
    "MIN_VISIBLE_IMAGE_FRACTION", "PATTERNS", "SHAPES", "SHAPE_AREA", "SIZES", "SYNTHETIC_CLUSTERS", "ClassSpec",
    "PlacedObject", "Scene", "SceneGenerator", "caption_phrase", "held_out_samples", "knowledge_base",
    "sentence_tables", "shape_test", "synthetic_bank", "synthetic_vocabulary", "write_dataset",
]
