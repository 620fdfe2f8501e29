"""README promise: ``--batch-size`` does not change results (issue 24, item 1).

The LVC CAMs of ``cam --checkpoint`` / ``pseudo-label --checkpoint`` couple each image with its mirror image (the
relation mean is per (image, mirror) pair), and ``segment`` runs the mirrored inputs of a whole batch behind the
plain ones: a pairing bug at ``--batch-size 3`` would silently change labels. Four synthetic scenes of four
different sizes (square, landscape, portrait, odd) run once one at a time and once in batches of 3 (a full batch
and a ragged one) through the three commands, on the shipped synthetic CLIP and its shipped heads:

* labels equal (at most 0.1 % of the pixels may differ, where float rounding flips an argmax tie);
* the saved float16 logits / CAMs within the magnitude-scaled float32 rule of ``tests/numerics.py`` plus one
  float16 step at the largest magnitude (they are stored as float16, so a float32 difference far below the
  tolerance can still round to neighbouring float16 values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from excelseg.cli import main
from numerics import F32_REL, rel_err

pytest.importorskip("open_clip")

# one float16 step relative to the largest magnitude (2^-10): the storage rounding of the saved archives
F16_STEP = 2.0 ** -10
SIZES = [(96, 96), (120, 80), (70, 130), (101, 99)]  # (W, H): square, landscape, portrait, odd sides
MAX_LABEL_DIFF = 0.001  # fraction of pixels


def _heads() -> Path:
    from excelseg.synthetic.trained import heads_path

    path = heads_path()
    if not path.is_file():
        pytest.skip("shipped synthetic heads are not in this installation")
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four scenes resized to four different sizes, and a folder dataset (labels file + index) over them."""
    from excelseg.synthetic import CLASS_NAMES, SceneGenerator

    root = tmp_path_factory.mktemp("scenes")
    images = root / "images"
    images.mkdir()
    gen = SceneGenerator(size=128, seed=5)
    lines = ["image,classes"]
    for i, (w, h) in enumerate(SIZES):
        sc = gen.scene(i)
        Image.fromarray(np.asarray(sc.image)).resize((w, h), Image.BILINEAR).save(images / f"im{i}.png")
        lines.append(f"im{i}.png," + ";".join(sc.names))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    index = root / "index.json"
    assert main(["prepare", "--dataset", "folder", "--root", str(images), "--labels", str(root / "labels.csv"),
                 "--classes", ",".join(CLASS_NAMES), "--out", str(index), "--workers", "0"]) == 0
    return images, index


def _run(kind: str, scenes, out: Path, batch: int) -> None:
    images, index = scenes
    common = ["--checkpoint", str(_heads()), "--clip", "synthetic", "--device", "cpu", "--out-dir", str(out),
              "--batch-size", str(batch), "--no-overlap"]
    if kind == "cam":
        args = ["cam", str(images), "--save-cams", *common]
    elif kind == "pseudo-label":
        args = ["pseudo-label", "--dataset", "folder", "--index", str(index), "--workers", "0", "--save-cams",
                "--cam-size", "full", *common]
    else:
        # two scales keep it fast: 1.0 (no flip, the VOC quirk) and 0.7 with its mirror images behind the batch
        args = ["segment", str(images), "--save-logits", "segment.scales=[1.0,0.7]", *common]
    assert main(args) == 0


@pytest.mark.parametrize("kind", ["cam", "pseudo-label", "segment"])
def test_batch_size_does_not_change_results(kind, scenes, tmp_path):
    one, three = tmp_path / "b1", tmp_path / "b3"
    _run(kind, scenes, one, 1)
    _run(kind, scenes, three, 3)
    archive, key = ("_logits.npz", "logits") if kind == "segment" else ("_cams.npz", "cams")
    for i, (w, h) in enumerate(SIZES):
        a = np.asarray(Image.open(one / f"im{i}.png"))
        b = np.asarray(Image.open(three / f"im{i}.png"))
        assert a.shape == b.shape == (h, w), (kind, i, a.shape, b.shape)
        assert len(np.unique(a)) > 1, f"{kind} im{i}: a one-class label would make the comparison vacuous"
        differ = float((a != b).mean())
        assert differ <= MAX_LABEL_DIFF, f"{kind} im{i}: {differ:.2%} of the label pixels changed with batch 3"
        with np.load(one / f"im{i}{archive}") as za, np.load(three / f"im{i}{archive}") as zb:
            x, y = za[key], zb[key]
            assert x.shape == y.shape and x.shape[-2:] == (h, w), (kind, i, x.shape, y.shape)
            err = rel_err(y, x)
            assert err <= F32_REL + F16_STEP, f"{kind} im{i}: saved {key} max|Δ|/max|ref| = {err:.2e} with batch 3"
