"""The heads trained on generated scenes and shipped with excelseg (``assets/synthetic_heads.safetensors``).

``excelseg train --config synthetic`` trains ExCEL's adapter and decoder (paper §3.3–3.4, single stage) on the
``train`` split of :mod:`excelseg.data.synthetic` with the shipped synthetic CLIP and the synthetic TSE bank;
its last checkpoint (:func:`excelseg.interop.save_checkpoint` format) is shipped so the demo, the ablation and the
regression tests can show the trained half of the method without training. The sibling ``.json`` records the
command, seed, wall time and the figures it was shipped with.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["SYNTHETIC_HEADS", "heads_path", "load_trained"]

SYNTHETIC_HEADS = "assets/synthetic_heads.safetensors"  # inside the excelseg package


def heads_path() -> Path:
    """Path of the shipped heads (may be missing in a stripped installation)."""
    return Path(str(resources.files("excelseg").joinpath(SYNTHETIC_HEADS)))


def load_trained(clip: Any, checkpoint: str | Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """The shipped (or given) synthetic heads on ``clip``, ready to score.

    Returns ``{"checkpoint": HeadsCheckpoint, "model": ExcelModel (eval mode; its pseudo-labels:
    :func:`~excelseg.synthetic.seeds.pseudo_label_miou`), "segmenter": Segmenter, "bank": the TSE bank the heads
    were trained with}``. Heads made for other CLIP weights are refused (:func:`excelseg.interop.check_checkpoint`).
    """
    from ..build import build_model
    from ..io.checkpoint import load_checkpoint
    from ..segmenter import Segmenter
    from .dataset import synthetic_vocabulary
    from .knowledge import synthetic_bank

    path = Path(checkpoint) if checkpoint is not None else heads_path()
    if not path.is_file():
        raise FileNotFoundError(f"synthetic heads not found: {path}")
    ckpt = load_checkpoint(path)
    bank = synthetic_bank(clip, template=ckpt.config.text.template)
    model = build_model(clip, vocabulary=synthetic_vocabulary(), bank=bank, checkpoint=ckpt, device=device).eval()
    segmenter = Segmenter(model)
    return {"checkpoint": ckpt, "model": model, "segmenter": segmenter, "bank": bank}
