"""Datasets: PASCAL VOC, MS-COCO and your own folder of tagged images, behind one interface.

``excelseg prepare voc|coco|folder`` checks a dataset and writes its index JSON (:mod:`excelseg.data.index`);
:class:`SegDataset` reads any index::

    from excelseg.data import TrainAugmentation, collate_fixed, open_dataset
    val = open_dataset("voc", "~/data/VOCdevkit", split="val")
    s = val[0]   # {"name", "image" H×W×3 uint8, "label" (20,) float32, "mask" H×W uint8, "size" (H, W)}
    train = open_dataset("voc", "~/data/VOCdevkit", split="train_aug",
                         transform=TrainAugmentation(rng=np.random.default_rng(0)))

Generated scenes need no ``prepare``: ``open_dataset("synthetic", split="train")`` (:mod:`excelseg.data.synthetic`).

Library equivalents of ``prepare``: :func:`build_voc_index`, :func:`build_coco_index`, :func:`build_folder_index`
(each returns a :class:`PrepareResult`; :func:`save_index` writes it). Own images without ``prepare``: ``FolderDataset("photos/", "labels.csv", masks_dir=None, classes=None)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .coco import build_coco_index
from .dataset import Sample, SegDataset, collate, collate_fixed
from .folder import FolderDataset, build_folder_index, read_labels_file
from .index import DEFAULT_INDEX_NAME, DatasetUnusableError, PrepareResult, Problem, load_index, save_index
from .transforms import TrainAugmentation, seed_worker
from .voc import build_voc_index, find_voc_root

__all__ = [
    "DATASET_KINDS",
    "DEFAULT_INDEX_NAME",
    "DEFAULT_SPLITS",
    "GENERATED_KINDS",
    "SYNTHETIC",
    "DatasetUnusableError",
    "FolderDataset",
    "PrepareResult",
    "Problem",
    "SegDataset",
    "TrainAugmentation",
    "build_coco_index",
    "build_folder_index",
    "build_voc_index",
    "collate",
    "collate_fixed",
    "default_index_path",
    "find_voc_root",
    "load_index",
    "open_dataset",
    "read_labels_file",
    "save_index",
    "seed_worker",
]

DATASET_KINDS = ("voc", "coco", "folder")
DEFAULT_SPLITS = {"voc": "val", "coco": "val", "folder": "all"}
SYNTHETIC = "synthetic"  # generated scenes (excelseg.data.synthetic): no root, no index
#: dataset kinds generated on the fly (no root, no index) → the shipped CLIP weights made on them
GENERATED_KINDS = {SYNTHETIC: "synthetic"}


def default_index_path(kind: str, root: str | os.PathLike[str]) -> Path:
    """Where ``excelseg prepare KIND ROOT`` writes the index by default."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: use {', '.join(DATASET_KINDS)}")
    if kind == "voc":
        return find_voc_root(root) / DEFAULT_INDEX_NAME
    return Path(root).expanduser() / DEFAULT_INDEX_NAME


def open_dataset(
    kind: str,
    root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    index: str | os.PathLike[str] | None = None,
    transform: Callable[[Sample], Sample] | None = None,
    with_mask: bool = True,
) -> SegDataset:
    """A :class:`SegDataset` of a prepared dataset (or, for ``"synthetic"``, a
    :class:`~excelseg.data.synthetic.SyntheticDataset` of generated scenes; ``root`` and ``index`` unused).

    Args:
        kind: ``"voc"``, ``"coco"``, ``"folder"`` or ``"synthetic"``.
        root: dataset root (VOC: ``VOC2012``, ``VOCdevkit`` or its parent; folder: the images folder); it
            overrides the root recorded in the index (the data moved). Needed unless ``index`` is given.
        split: default ``val`` (VOC, COCO) or ``all`` (folder).
        index: index JSON (default: the one ``excelseg prepare`` writes under ``root``).
    """
    if kind in GENERATED_KINDS:
        from .synthetic import SyntheticDataset

        return SyntheticDataset(split or "val", transform=transform, with_mask=with_mask)  # type: ignore[return-value]
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: use {', '.join(DATASET_KINDS)} or {SYNTHETIC}")
    if index is None and root is None:
        raise ValueError("give the dataset root or its index file")
    data_root = None
    if root is not None:
        if kind == "voc":
            data_root = find_voc_root(root)
        else:
            data_root = Path(root).expanduser()
    index_path = Path(index).expanduser() if index is not None else default_index_path(kind, root)  # type: ignore[arg-type]
    if not index_path.is_file():
        where = f" {root}" if root is not None else " ROOT"
        raise FileNotFoundError(f"no dataset index at {index_path}: run 'excelseg prepare {kind}{where}' first")
    data = load_index(index_path)
    if data["dataset"] != kind:
        raise ValueError(f"{index_path} indexes a {data['dataset']} dataset, not {kind}")
    if data_root is not None and data_root.resolve() == Path(data["root"]).resolve():
        data_root = None
    ds = SegDataset(data, split or DEFAULT_SPLITS[kind], transform=transform, with_mask=with_mask, root=data_root)
    ds.index_path = index_path
    return ds
