"""excelseg: ExCEL (CVPR 2025) — CLIP dense knowledge for weakly supervised semantic segmentation.

Public API::

    import excelseg
    model = excelseg.build_model(clip="ViT-B-16")  # loads everything: weights, bank, checkpoint, settings
    p = excelseg.CamPredictor(model)              # or CamPredictor(clip="ViT-B-16"), which builds one
    r = p.set_image(image).predict(["cat", "dog"])
    r.cams          # K×H×W float32 in [0, 1]
    r.pseudo_label  # H×W uint8, 0 = background
    f = excelseg.dense_features(clip, images, attention="naclip")  # B×N×E patch features (any attention mode)

    s = Segmenter.from_checkpoint("voc_heads.safetensors")   # trained heads (+ the CLIP they record)
    s.predict(image).label                                    # H×W uint8, multi-scale + flip

The names below are imported on first use (PEP 562), so ``import excelseg`` and the CLI's ``--help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "PAPER_COCO": "config", "PAPER_VOC": "config", "PRESETS": "config", "CamConfig": "config",
    "PipelineConfig": "config", "RefineConfig": "config", "TextConfig": "config", "load_config": "config",
    "CamPredictor": "predictor", "CamResult": "predictor", "SegResult": "segmenter", "Segmenter": "segmenter",
    "AttributeBank": "bank", "build_model": "build", "ExcelModel": "model", "dense_features": "features",
    "Vocabulary": "vocab",
    "LoadedClip": "weights", "load_clip": "weights",
}

__all__ = [
    "PAPER_COCO", "PAPER_VOC", "PRESETS", "AttributeBank", "CamConfig", "CamPredictor", "CamResult", "ExcelModel",
    "LoadedClip",
    "PipelineConfig", "RefineConfig", "SegResult", "Segmenter", "TextConfig", "Vocabulary", "__version__",
    "build_model", "dense_features", "load_clip", "load_config",
]

if TYPE_CHECKING:
    from .bank import AttributeBank
    from .build import build_model
    from .config import (
        PAPER_COCO,
        PAPER_VOC,
        PRESETS,
        CamConfig,
        PipelineConfig,
        RefineConfig,
        TextConfig,
        load_config,
    )
    from .features import dense_features
    from .model import ExcelModel
    from .predictor import CamPredictor, CamResult
    from .segmenter import Segmenter, SegResult
    from .vocab import Vocabulary
    from .weights import LoadedClip, load_clip


def __getattr__(name: str) -> Any:
    if name == "native":  # moved in 0.2 (private: the C kernels behind excelseg.par)
        import warnings

        warnings.warn("excelseg.native moved to excelseg._native (private); PAR is excelseg.par.par",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("._native", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'excelseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
