"""Confusion-matrix metrics (EXCEL_SPEC §6) and their parity with the reference's golden metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.metrics import SegmentationMetric, format_table

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "parity" / "golden"
VOC_SAMPLE = SHARED / "data" / "voc_sample"
LABEL_KEYS = ("pseudo_static", "pseudo_lvc", "pseudo_val", "seg_val", "msc_pred")


def _pairs_to_arrays(pairs: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """[(gt, pred, count), ...] → flat (1, N) gt / pred maps with exactly those pixel counts."""
    gt = np.concatenate([np.full(n, g, np.uint8) for g, _, n in pairs])[None]
    pred = np.concatenate([np.full(n, p, np.uint8) for _, p, n in pairs])[None]
    return pred, gt


# Confusion matrix, rows = GT, columns = prediction:
#            pred 0  pred 1  pred 2    row (GT) sum
#   gt 0        3       1       0        4
#   gt 1        0       2       1        3
#   gt 2        1       0       2        3
#   col sum     4       3       3       10
# IoU_c = diag / (row + col − diag): 3/(4+4−3) = 0.6, 2/(3+3−2) = 0.5, 2/(3+3−2) = 0.5 → mIoU = 1.6/3
# pixel accuracy = (3+2+2)/10 = 0.7; recall = 3/4, 2/3, 2/3 → mAcc = (0.75 + 4/3)/3; precision = 3/4, 2/3, 2/3
THREE_CLASS = [(0, 0, 3), (0, 1, 1), (1, 1, 2), (1, 2, 1), (2, 0, 1), (2, 2, 2)]


def test_three_class_hand_computed():
    pred, gt = _pairs_to_arrays(THREE_CLASS)
    m = SegmentationMetric(3, class_names=["bg", "cat", "dog"])
    m.update(pred, gt)
    np.testing.assert_array_equal(m.confusion, [[3, 1, 0], [0, 2, 1], [1, 0, 2]])
    assert m.confusion.dtype == np.int64
    r = m.compute()
    np.testing.assert_allclose(r["iou"], [0.6, 0.5, 0.5])
    assert r["miou"] == pytest.approx(1.6 / 3)
    assert r["mean_all_classes"] == pytest.approx(1.6 / 3)
    assert r["pixel_accuracy"] == pytest.approx(0.7)
    assert r["mean_accuracy"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    np.testing.assert_allclose(r["recall"], [0.75, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r["precision"], [0.75, 2 / 3, 2 / 3])
    assert r["confusion"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert r["num_classes"] == 3 and r["class_names"] == ["bg", "cat", "dog"]
    assert r["pixels"] == 10
    json.dumps(r)  # plain Python types only


def test_class_predicted_but_absent_from_gt_and_class_absent_from_both():
    # 4 classes; GT has only 0 and 1; class 2 is predicted (2 px) but never in GT; class 3 appears nowhere.
    #            pred 0  pred 1  pred 2  pred 3
    #   gt 0        4       0       2       0      IoU0 = 4/(6+5−4) = 4/7
    #   gt 1        1       3       0       0      IoU1 = 3/(4+3−3) = 3/4
    #   gt 2, gt 3: empty rows                     IoU2 = 0/(0+2−0) = 0, IoU3 = 0/0 = NaN
    # mIoU over GT-present classes = (4/7 + 3/4)/2; the all-class mean is NaN (class 3), nanmean would add the 0.
    pred, gt = _pairs_to_arrays([(0, 0, 4), (0, 2, 2), (1, 0, 1), (1, 1, 3)])
    m = SegmentationMetric(4)
    m.update(pred, gt)
    r = m.compute()
    assert r["iou"][0] == pytest.approx(4 / 7)
    assert r["iou"][1] == pytest.approx(3 / 4)
    assert r["iou"][2] == 0.0
    assert math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((4 / 7 + 3 / 4) / 2)
    assert math.isnan(r["mean_all_classes"])
    assert r["gt_present"] == [True, True, False, False]
    assert math.isnan(r["recall"][2]) and math.isnan(r["recall"][3])
    assert r["precision"][2] == 0.0 and math.isnan(r["precision"][3])
    # mAcc skips classes absent from GT: (4/6 + 3/4) / 2
    assert r["mean_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    table = format_table(r)
    assert "mIoU (2/4 classes present in GT)" in table
    assert "mean IoU over all 4 classes" in table
    assert "class 2 *" in table


def test_ignore_pixels_dropped_even_with_odd_predictions():
    gt = np.array([[0, 1, 255], [255, 1, 0]], np.uint8)
    pred = np.array([[0, 1, 200], [7, 0, 0]], np.uint8)  # 200 and 7 sit on ignored pixels only
    m = SegmentationMetric(2)
    m.update(pred, gt)
    np.testing.assert_array_equal(m.confusion, [[2, 0], [1, 1]])
    m2 = SegmentationMetric(2, ignore_index=0)
    m2.update(np.array([[1, 1]]), np.array([[0, 1]]))
    np.testing.assert_array_equal(m2.confusion, [[0, 0], [0, 1]])
    m2.update([[1, 0]], [[1, 1]])  # nested lists are fine too
    np.testing.assert_array_equal(m2.confusion, [[0, 0], [1, 2]])


def test_errors_name_shapes_and_values():
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        m.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="ground-truth values outside.*: 3, 7"):
        m.update(np.zeros((1, 4), np.int64), np.array([[0, 3, 7, 255]]))
    with pytest.raises(ValueError, match="prediction values outside.*: -1, 5"):
        m.update(np.array([[5, -1, 0]]), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="integer class ids"):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        m.update(np.zeros((1, 1, 2, 2), np.int64), np.zeros((1, 1, 2, 2), np.int64))
    with pytest.raises(ValueError, match="prediction values outside"):
        m.update(torch.tensor([[4, 0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="ground-truth values outside.*: 9"):
        m.update(torch.tensor([[0, 0]]), torch.tensor([[9, 0]]))
    assert m.confusion.sum() == 0  # failed updates add nothing
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetric(3, class_names=["a", "b"])
    with pytest.raises(ValueError):
        SegmentationMetric(0)


def test_batches_torch_merge_and_reset_agree():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(4, 16, 12)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=gt.shape).astype(np.int64)

    single = SegmentationMetric(5)
    single.update(pred, gt)  # one (B, H, W) pass

    per_image = SegmentationMetric(5)
    for p, g in zip(pred, gt):
        per_image.update(p, g)
    np.testing.assert_array_equal(per_image.confusion, single.confusion)

    tensors = SegmentationMetric(5)
    tensors.update(torch.from_numpy(pred), torch.from_numpy(gt))
    np.testing.assert_array_equal(tensors.confusion, single.confusion)
    mixed = SegmentationMetric(5)
    mixed.update(torch.from_numpy(pred), gt)
    np.testing.assert_array_equal(mixed.confusion, single.confusion)

    a, b = SegmentationMetric(5), SegmentationMetric(5)
    a.update(pred[:1], gt[:1])
    b.update(pred[1:], gt[1:])
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.confusion, single.confusion)
    assert a.compute() == single.compute()
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(SegmentationMetric(4))

    a.reset()
    assert a.confusion.sum() == 0 and a.compute()["pixels"] == 0
    empty = a.compute()
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_accuracy"])


def test_format_table_layout():
    pred, gt = _pairs_to_arrays(THREE_CLASS)
    m = SegmentationMetric(3, class_names=["background", "cat", "dog"])
    m.update(pred, gt)
    table = m.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "prec.", "recall"]
    assert len({len(line) for line in lines[:6]}) == 1  # fixed width
    assert lines[2].split() == ["background", "60.00", "75.00", "75.00"]
    assert "mIoU (3/3 classes present in GT): 53.33" in table
    assert "mean IoU over all" not in table  # identical to mIoU here
    assert "pixel accuracy: 70.00" in table


def _golden_metrics() -> dict:
    path = GOLDEN / "metrics.json"
    if not path.is_file():
        pytest.skip(f"parity kit not available: {path} is missing (expected the shared folder next to the repo)")
    return json.loads(path.read_text())


def _same(a: float, b: float | None) -> bool:
    return (math.isnan(a) and b is None) or (b is not None and math.isnan(b) and math.isnan(a)) or a == b


@pytest.mark.parametrize("key", LABEL_KEYS)
def test_golden_numbers_from_golden_hist(key):
    """The reference's scores(), recomputed from its own confusion matrix, match bit for bit."""
    ref = _golden_metrics()[key]
    r = SegmentationMetric.from_confusion(ref["hist"]).compute()
    assert all(_same(a, b) for a, b in zip(r["iou"], ref["iou"])), (r["iou"], ref["iou"])
    assert _same(r["miou"], ref["miou"])
    assert _same(r["mean_all_classes"], ref["mean_all_classes"])
    assert _same(r["pixel_accuracy"], ref["pAcc"])
    assert _same(r["mean_accuracy"], ref["mAcc"])


def test_golden_label_maps_reproduce_hist():
    """Golden label maps vs the sample GT masks (19 images pooled, 21 classes) give the golden hist exactly."""
    golden = _golden_metrics()
    manifest_path = VOC_SAMPLE / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip(f"sample data not available: {manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    entries = [(name, e) for group in ("orig", "crop513") for name, e in manifest[group].items()]
    assert len(entries) == 19
    metrics = {key: SegmentationMetric(21) for key in LABEL_KEYS}
    for name, entry in entries:
        gt = np.array(Image.open(VOC_SAMPLE / entry["mask"]))
        with np.load(GOLDEN / f"{name}.npz") as z:
            for key in LABEL_KEYS:
                metrics[key].update(z[key], gt)
    for key in LABEL_KEYS:
        np.testing.assert_array_equal(metrics[key].confusion, np.array(golden[key]["hist"]), err_msg=key)
        assert metrics[key].compute()["miou"] == pytest.approx(golden[key]["miou"], abs=1e-6)
    assert metrics["pseudo_static"].compute()["miou"] == pytest.approx(0.1172, abs=1e-4)
