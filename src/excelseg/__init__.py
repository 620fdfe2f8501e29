"""excelseg: ExCEL (CVPR 2025) — CLIP dense knowledge for weakly supervised semantic segmentation."""

__version__ = "0.1.0"
