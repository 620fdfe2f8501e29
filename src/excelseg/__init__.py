"""excelseg: ExCEL (CVPR 2025) — CLIP dense knowledge for weakly supervised semantic segmentation.

Public API::

    from excelseg import CamPredictor
    p = CamPredictor(clip="ViT-B-16")          # weights resolved by excelseg.load_clip
    r = p.set_image(image).predict(["cat", "dog"])
    r.cams          # K×H×W float32 in [0, 1]
    r.pseudo_label  # H×W uint8, 0 = background
"""

__version__ = "0.1.0"

from .config import PAPER_COCO, PAPER_VOC, PRESETS, CamConfig, PipelineConfig, RefineConfig, TextConfig
from .predictor import CamPredictor, CamResult
from .text import AttributeBank
from .vocab import Vocabulary
from .weights import LoadedClip, load_clip

__all__ = [
    "PAPER_COCO",
    "PAPER_VOC",
    "PRESETS",
    "AttributeBank",
    "CamConfig",
    "CamPredictor",
    "CamResult",
    "LoadedClip",
    "PipelineConfig",
    "RefineConfig",
    "TextConfig",
    "Vocabulary",
    "load_clip",
]
