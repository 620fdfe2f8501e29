"""Optional dense CRF post-processing (Krähenbühl & Koltun 2011) with the reference's parameters (EXCEL_SPEC §6).

The reference (``utils/dcrf.py``) runs a fully connected CRF on per-pixel class probabilities and the uint8 RGB
image: unary ``−log p``, a Gaussian smoothness kernel (``pos_xy_std``, weight ``pos_w``) and a bilateral appearance
kernel (``bi_xy_std``, ``bi_rgb_std``, weight ``bi_w``), ``iter_max`` mean-field iterations. :data:`REFERENCE_CRF`
holds its values ``DenseCRF(iter_max=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4)``.

The CRF itself comes from ``pydensecrf`` (the ``[crf]`` extra, ``pip install 'excelseg[crf]'`` installs
``pydensecrf2``); it is imported only when a CRF is run, and a missing package is one :class:`ImportError` line
naming the extra. Cost: about linear in pixels × classes; a 500×375 VOC image with 3 channels takes ~0.1–0.3 s on
one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["REFERENCE_CRF", "CrfConfig", "crf_available", "dense_crf", "require_crf"]

_INSTALL_HINT = "dense CRF needs the [crf] extra: pip install 'excelseg[crf]' (installs pydensecrf2)"
_MIN_PROB = 1e-5  # probabilities are clipped here before −log, as pydensecrf.utils.unary_from_softmax does


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF parameters (the names of the reference's ``DenseCRF``)."""

    iter_max: int = 10  # mean-field iterations
    pos_xy_std: float = 1.0  # Gaussian (smoothness) kernel: spatial std in pixels
    pos_w: float = 3.0  # Gaussian kernel weight (Potts compatibility)
    bi_xy_std: float = 67.0  # bilateral (appearance) kernel: spatial std in pixels
    bi_rgb_std: float = 3.0  # bilateral kernel: colour std in 0–255 units
    bi_w: float = 4.0  # bilateral kernel weight


#: The reference's parameters (``infer_seg_voc.py`` / ``infer_lam.py`` / ``infer_seg_coco.py``).
REFERENCE_CRF = CrfConfig()


def _import_dcrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return dcrf


def crf_available() -> bool:
    """Whether ``pydensecrf`` can be imported."""
    try:
        _import_dcrf()
    except ImportError:
        return False
    return True


def require_crf() -> None:
    """Raise the one-line :class:`ImportError` naming the ``[crf]`` extra when ``pydensecrf`` is missing."""
    _import_dcrf()


def dense_crf(image: np.ndarray, probs: np.ndarray, config: CrfConfig = REFERENCE_CRF) -> np.ndarray:
    """Mean-field dense CRF inference.

    Args:
        image: (H, W, 3) uint8 RGB image.
        probs: (C, H, W) per-pixel class probabilities (each pixel's column sums to 1; values are clipped to
            ``1e-5`` before the unary ``−log p``). Any float dtype.
        config: kernel parameters (default: the reference's).

    Returns:
        (C, H, W) float32 marginals after ``config.iter_max`` iterations (argmax over axis 0 = the CRF label).
    """
    dcrf = _import_dcrf()
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    c, h, w = probs.shape
    if c < 2:  # one label: nothing to decide
        return np.ones((c, h, w), np.float32)
    unary = -np.log(np.clip(probs.reshape(c, h * w), _MIN_PROB, None)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=config.pos_xy_std, compat=config.pos_w)
    crf.addPairwiseBilateral(sxy=config.bi_xy_std, srgb=config.bi_rgb_std, rgbim=np.ascontiguousarray(image),
                             compat=config.bi_w)
    q = crf.inference(int(config.iter_max))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)
