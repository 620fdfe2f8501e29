"""Confusion-matrix segmentation metrics: per-class IoU, mIoU, pixel and mean accuracy (EXCEL_SPEC §6).

The numbers are those of the reference's ``utils/evaluate.py::scores`` (verified bit-for-bit against the parity
kit's ``golden/metrics.json``):

* confusion matrix ``M`` (rows = ground truth, columns = prediction) over pixels whose GT is not ``ignore_index``;
* ``IoU_c = M_cc / (Σ_j M_cj + Σ_i M_ic − M_cc)`` — NaN when class ``c`` is in neither GT nor prediction,
  0 when it is predicted but absent from GT;
* ``miou`` = nanmean of the IoUs of the classes that **occur in the GT** (row sum > 0): a class that is only
  predicted does not count (its IoU of 0 is reported but not averaged);
* ``mean_all_classes`` = plain mean of all per-class IoUs, NaN-propagating (what the reference's logged tables
  print; equal to ``miou`` when every class occurs in GT, as on the full VOC val set);
* ``pixel_accuracy`` = trace / total; ``mean_accuracy`` = nanmean of the per-class recall ``M_cc / Σ_j M_cj``
  (classes absent from GT are NaN and skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["SegmentationMetric", "format_table"]

try:  # torch is a core dependency, but the metric itself needs only numpy
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]


def _is_tensor(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _describe_values(values: Any, limit: int = 10) -> str:
    vals = [int(v) for v in values]
    text = ", ".join(str(v) for v in vals[:limit])
    return text + (f", … ({len(vals)} distinct)" if len(vals) > limit else "")


def _nanmean(x: np.ndarray) -> float:
    """nanmean without the "mean of empty slice" warning: NaN when nothing is finite."""
    valid = ~np.isnan(x)
    if not valid.any():
        return math.nan
    return float(np.nanmean(x))


class SegmentationMetric:
    """Accumulates a ``num_classes × num_classes`` confusion matrix (int64; rows = GT, columns = prediction).

    Example::

        metric = SegmentationMetric(21, class_names=VOC_CLASSES)
        for pred, gt in batches:            # (H, W) or (B, H, W) integer arrays / tensors
            metric.update(pred, gt)
        result = metric.compute()
        print(format_table(result))

    Args:
        num_classes: number of classes C (ids 0 … C−1, background included).
        ignore_index: GT value whose pixels are dropped (255 in VOC / COCO).
        class_names: C names for tables (default ``class 0`` …).
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if class_names is None:
            class_names = [f"class {i}" for i in range(self.num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for {self.num_classes} classes")
        self.class_names: list[str] = class_names
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"SegmentationMetric(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.confusion.sum())})"
        )

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion[...] = 0

    # ----------------------------------------------------------------------------------------------------------
    def update(self, pred: Any, gt: Any) -> None:
        """Add a prediction / ground-truth pair.

        Args:
            pred: ``(H, W)`` or ``(B, H, W)`` integer class ids, numpy array or torch tensor (any device).
            gt: same shape; ``ignore_index`` pixels are dropped.

        Raises:
            ValueError: shapes differ or are not 2-/3-D, a dtype is not integer, a GT value (other than
                ``ignore_index``) or a prediction value at a non-ignored pixel lies outside [0, C) — the message
                names the offending values.
        """
        if not _is_tensor(pred):
            pred = np.asarray(pred)
        if not _is_tensor(gt):
            gt = np.asarray(gt)
        pred_shape, gt_shape = tuple(pred.shape), tuple(gt.shape)
        if pred_shape != gt_shape:
            raise ValueError(f"prediction shape {pred_shape} and ground-truth shape {gt_shape} differ")
        if len(gt_shape) not in (2, 3):
            raise ValueError(f"expected (H, W) or (B, H, W) label maps, got shape {gt_shape}")
        if _is_tensor(pred) and _is_tensor(gt) and pred.device == gt.device:
            hist = self._hist_torch(pred, gt)
        else:
            hist = self._hist_numpy(
                pred.detach().cpu().numpy() if _is_tensor(pred) else pred,
                gt.detach().cpu().numpy() if _is_tensor(gt) else gt,
            )
        self.confusion += hist

    def _check_dtype(self, kind: str, name: str, dtype: Any) -> None:
        if kind not in "biu":
            raise ValueError(
                f"{name} must hold integer class ids, got dtype {dtype} (take the argmax over classes first)"
            )

    def _hist_numpy(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        self._check_dtype(pred.dtype.kind, "prediction", pred.dtype)
        self._check_dtype(gt.dtype.kind, "ground truth", gt.dtype)
        c = self.num_classes
        gt = gt.reshape(-1)
        pred = pred.reshape(-1)
        keep = gt != self.ignore_index
        if not keep.all():
            gt = gt[keep]
            pred = pred[keep]
        gt = gt.astype(np.int64, copy=False)
        pred = pred.astype(np.int64, copy=False)
        bad_gt = (gt < 0) | (gt >= c)
        if bad_gt.any():
            raise ValueError(
                f"ground-truth values outside [0, {c}) (ignore_index {self.ignore_index} excepted): "
                f"{_describe_values(np.unique(gt[bad_gt]))}"
            )
        bad_pred = (pred < 0) | (pred >= c)
        if bad_pred.any():
            raise ValueError(
                f"prediction values outside [0, {c}) at non-ignored pixels: "
                f"{_describe_values(np.unique(pred[bad_pred]))}"
            )
        return np.bincount(gt * c + pred, minlength=c * c).reshape(c, c).astype(np.int64, copy=False)

    def _hist_torch(self, pred: Any, gt: Any) -> np.ndarray:
        for t, name in ((pred, "prediction"), (gt, "ground truth")):
            if t.is_floating_point() or t.is_complex():
                self._check_dtype("f", name, t.dtype)
        c = self.num_classes
        gt = gt.reshape(-1)
        pred = pred.reshape(-1)
        keep = gt != self.ignore_index
        gt = gt[keep].long()
        pred = pred[keep].long()
        bad_gt = (gt < 0) | (gt >= c)
        if bool(bad_gt.any()):
            raise ValueError(
                f"ground-truth values outside [0, {c}) (ignore_index {self.ignore_index} excepted): "
                f"{_describe_values(torch.unique(gt[bad_gt]).tolist())}"
            )
        bad_pred = (pred < 0) | (pred >= c)
        if bool(bad_pred.any()):
            raise ValueError(
                f"prediction values outside [0, {c}) at non-ignored pixels: "
                f"{_describe_values(torch.unique(pred[bad_pred]).tolist())}"
            )
        hist = torch.bincount(gt * c + pred, minlength=c * c)
        return hist.reshape(c, c).cpu().numpy().astype(np.int64, copy=False)

    # ----------------------------------------------------------------------------------------------------------
    def update_confusion(self, confusion: Any) -> None:
        """Add a precomputed ``C × C`` confusion matrix (rows = GT), e.g. one stored in a JSON file."""
        m = np.asarray(confusion)
        if m.shape != self.confusion.shape:
            raise ValueError(f"confusion matrix shape {m.shape} does not match {self.confusion.shape}")
        if m.dtype.kind == "f":
            if not np.all(np.isfinite(m)) or not np.all(m == np.round(m)):
                raise ValueError("confusion matrix must hold whole pixel counts")
        elif m.dtype.kind not in "iu":
            raise ValueError(f"confusion matrix must hold pixel counts, got dtype {m.dtype}")
        if (m < 0).any():
            raise ValueError("confusion matrix has negative counts")
        self.confusion += m.astype(np.int64)

    @classmethod
    def from_confusion(
        cls, confusion: Any, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> SegmentationMetric:
        """A metric holding the given ``C × C`` confusion matrix (rows = GT, columns = prediction)."""
        m = np.asarray(confusion)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
        metric = cls(m.shape[0], ignore_index=ignore_index, class_names=class_names)
        metric.update_confusion(m)
        return metric

    def merge(self, other: SegmentationMetric) -> SegmentationMetric:
        """Add another metric's counts into this one (e.g. from data-loader workers); returns ``self``."""
        if not isinstance(other, SegmentationMetric):
            raise TypeError(f"can only merge a SegmentationMetric, got {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge metrics with num_classes/ignore_index {other.num_classes}/{other.ignore_index} "
                f"into {self.num_classes}/{self.ignore_index}"
            )
        self.confusion += other.confusion
        return self

    def all_reduce(self) -> SegmentationMetric:
        """Sum the confusion matrices of all ranks when ``torch.distributed`` is initialised; returns ``self``.

        Every rank must call it. Without an initialised process group it does nothing.
        """
        if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return self
        device = torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.from_numpy(self.confusion.copy()).to(device)
        torch.distributed.all_reduce(t)
        self.confusion[...] = t.cpu().numpy()
        return self

    # ----------------------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, Any]:
        """The metrics of everything accumulated so far (fractions in [0, 1], NaN where undefined).

        Returns a JSON-ready dict (NaN as ``float('nan')``; :func:`excelseg.io.files.save_json` writes it as null):
        ``iou``, ``precision``, ``recall`` (lists of C), ``miou`` (mean over classes present in GT),
        ``mean_all_classes`` (plain mean over all C, NaN-propagating), ``pixel_accuracy``, ``mean_accuracy``,
        ``gt_present`` (list of bool), ``pixels`` (number counted), ``confusion`` (C × C nested lists),
        ``num_classes``, ``class_names``.
        """
        hist = self.confusion
        diag = np.diag(hist)
        gt_sum = hist.sum(axis=1)
        pred_sum = hist.sum(axis=0)
        total = int(hist.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            # same expressions (and float64 rounding) as the reference's utils/evaluate.py::scores
            iou = diag / (gt_sum + pred_sum - diag)
            recall = diag / gt_sum
            precision = diag / pred_sum
            pixel_accuracy = float(diag.sum() / total) if total else math.nan
        present = gt_sum > 0
        return {
            "iou": [float(v) for v in iou],
            "miou": _nanmean(iou[present]),
            "mean_all_classes": float(np.mean(iou)),
            "pixel_accuracy": pixel_accuracy,
            "mean_accuracy": _nanmean(recall),
            "precision": [float(v) for v in precision],
            "recall": [float(v) for v in recall],
            "gt_present": [bool(v) for v in present],
            "pixels": total,
            "confusion": hist.tolist(),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
        }

    def format_table(self, result: dict[str, Any] | None = None) -> str:
        """:func:`format_table` of ``result`` (default: :meth:`compute`)."""
        return format_table(self.compute() if result is None else result)


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100.0 * float(v):.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Fixed-width text table of :meth:`SegmentationMetric.compute` output (values in %).

    One row per class (IoU, precision, recall; "—" where undefined; ``*`` marks classes absent from the GT, which
    the mIoU skips), then the summary: mIoU over the classes present in GT, the mean over all classes when it
    differs, pixel accuracy and mean accuracy.
    """
    iou = result["iou"]
    n = len(iou)
    names = list(result.get("class_names") or [f"class {i}" for i in range(n)])
    precision = result.get("precision", [None] * n)
    recall = result.get("recall", [None] * n)
    present = result.get("gt_present")
    if present is None:
        present = [r is not None and not (isinstance(r, float) and math.isnan(r)) for r in recall]
    name_w = max(5, *(len(s) + 2 for s in names))
    header = f"{'class':<{name_w}}{'IoU':>8}{'prec.':>8}{'recall':>8}"
    lines = [header, "-" * len(header)]
    for i in range(n):
        mark = "" if present[i] else " *"
        lines.append(f"{names[i] + mark:<{name_w}}{_pct(iou[i]):>8}{_pct(precision[i]):>8}{_pct(recall[i]):>8}")
    lines.append("-" * len(header))
    n_present = sum(bool(p) for p in present)
    lines.append(f"mIoU ({n_present}/{n} classes present in GT): {_pct(result['miou'])}")
    miou, mean_all = result["miou"], result.get("mean_all_classes")
    same = (
        mean_all is not None
        and not (isinstance(mean_all, float) and math.isnan(mean_all))
        and not (isinstance(miou, float) and math.isnan(miou))
        and abs(float(mean_all) - float(miou)) < 5e-7
    )
    if not same:
        lines.append(f"mean IoU over all {n} classes: {_pct(mean_all)}")
    lines.append(
        f"pixel accuracy: {_pct(result.get('pixel_accuracy'))}   mean accuracy: {_pct(result.get('mean_accuracy'))}"
    )
    if n_present < n:
        lines.append("* absent from the ground truth (not in mIoU)")
    return "\n".join(lines)
