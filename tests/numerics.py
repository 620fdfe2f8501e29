"""Float comparisons that hold on any x86-64 CPU (AVX2 / AVX-512, Intel / AMD) and any thread count.

Two tools, used across the suite:

* **float64 oracles.** The tiny test models are cheap in double precision, so an implementation and its
  independent oracle are both run in float64: summation-order differences between kernels are then ~1e-15
  relative, and a tolerance of :data:`F64_REL` separates "same maths" from "different maths" by ~6 orders of
  magnitude on every machine.
* **magnitude-scaled float32 tolerances.** Where float32 itself is under test, the error is measured against the
  float64 oracle and bounded relative to the largest magnitude compared (``max|a − ref| ≤ rel · max|ref|``):
  BLAS/SDPA kernels reorder sums differently per ISA and thread count, so an absolute bound that holds for one
  value scale fails for another (the 1.2e-5 vs atol=1e-5 failure on AMD EPYC that motivated this module).
"""

from __future__ import annotations

import numpy as np
import torch

# float64 vs float64 with different summation orders: observed ≤ 1e-14 relative on the tiny models.
F64_REL = 1e-10
# float32 vs a float64 oracle through the 4-block tiny ViT (attention sharpened ×4, so softmax amplifies logit
# rounding): measured ≤ 4e-5 of max|ref| for tokens, SVC features and attention maps with ATen's default, AVX2 and
# AVX-512 kernels at 1 and 2 threads (open_clip's own float32 forward shows the same ~1e-5 level). 2e-4 = 5× margin;
# a wrong formula is off by ≥ 1e-3 relative (the tests check that too).
F32_REL = 2e-4
# A guard that a wrong result is told apart ("one PAR iteration fewer") must exceed the pass tolerance by this
# factor: a result off by less could pass the tolerance check, and the guard would prove nothing.
GUARD_MARGIN = 10


def as_f64(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_diff(actual, expected) -> float:
    a, e = as_f64(actual), as_f64(expected)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    return float(np.abs(a - e).max()) if a.size else 0.0


def rel_err(actual, expected) -> float:
    """``max|actual − expected| / max|expected|`` (0 when both are all zero)."""
    e = as_f64(expected)
    scale = float(np.abs(e).max()) if e.size else 0.0
    diff = max_abs_diff(actual, e)
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, rel: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= rel, f"{what}: max|Δ|/max|ref| = {err:.3e} > {rel:.1e}"
