"""Datasets: `excelseg prepare voc` on a miniature VOC tree, folder datasets, the training augmentation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.cli import main
from excelseg.data import (
    FolderDataset,
    SegDataset,
    TrainAugmentation,
    collate,
    collate_fixed,
    load_index,
    open_dataset,
    read_labels_file,
    seed_worker,
)
from excelseg.data.index import parallel_map
from excelseg.io import read_label_png, save_label_png
from excelseg.vocab import VOC_CLASSES

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_sample"
if not (SAMPLE / "manifest.json").is_file():
    SAMPLE = Path("/work/shared/data/voc_sample")


def _manifest() -> dict:
    if not (SAMPLE / "manifest.json").is_file():
        pytest.skip(f"VOC sample data not found at {SAMPLE} (shared/data/voc_sample/manifest.json)")
    return json.loads((SAMPLE / "manifest.json").read_text())["orig"]


def make_voc(base: Path, aug: bool = True) -> tuple[Path, dict]:
    """VOCdevkit/VOC2012 under ``base`` from the sample: val.txt = the manifest's val ids, train.txt = the first
    train_aug id, SegmentationClassAug = every mask (val included, so train_aug must leave val out)."""
    entries = _manifest()
    root = base / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    if aug:
        (root / "SegmentationClassAug").mkdir()
    for name, e in entries.items():
        shutil.copy(SAMPLE / e["image"], root / "JPEGImages" / f"{name}.jpg")
        shutil.copy(SAMPLE / e["mask"], root / "SegmentationClass" / f"{name}.png")
        if aug:
            shutil.copy(SAMPLE / e["mask"], root / "SegmentationClassAug" / f"{name}.png")
    val = [n for n, e in entries.items() if e["split"] == "val"]
    train_aug = sorted(n for n, e in entries.items() if e["split"] == "train_aug")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    (lists / "train.txt").write_text(train_aug[0] + "\n")
    return root, entries


@pytest.fixture()
def voc(tmp_path):
    return make_voc(tmp_path)


def prepare_voc(path, *extra) -> int:
    return main(["prepare", "voc", str(path), "--workers", "1", *map(str, extra)])


# ------------------------------------------------------------------------------------------------------------
# prepare voc


def test_prepare_voc_labels_and_splits(voc, capsys):
    root, entries = voc
    rc = main(["prepare", "voc", str(root.parent.parent), "--workers", "2"])  # the folder holding VOCdevkit
    assert rc == 0
    out = capsys.readouterr().out
    assert "test.txt not found" in out
    index = load_index(root / "excelseg_index.json")
    assert index["dataset"] == "voc" and index["class_names"] == list(VOC_CLASSES)
    assert index["root"] == str(root.resolve())
    for name, e in entries.items():
        assert index["labels"][name] == e["class_ids"]
        assert index["sizes"][name] == e["size_hw"]
    val = [n for n, e in entries.items() if e["split"] == "val"]
    assert index["splits"]["val"] == val
    assert index["splits"]["train_aug"] == sorted(n for n, e in entries.items() if e["split"] == "train_aug")
    assert not set(index["splits"]["train_aug"]) & set(val)
    assert "test" not in index["splits"] and not index["excluded"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # atomic write left nothing behind


def test_prepare_voc_without_aug_and_custom_out(tmp_path, capsys):
    root, entries = make_voc(tmp_path, aug=False)
    out = tmp_path / "idx" / "voc.json"
    assert prepare_voc(root.parent, "--out", out) == 0  # VOCdevkit accepted too
    assert "SegmentationClassAug not found: train_aug will not be available" in capsys.readouterr().out
    index = load_index(out)
    assert "train_aug" not in index["splits"]
    assert index["labels"] == {n: e["class_ids"] for n, e in entries.items()}


def test_prepare_voc_missing_folders(tmp_path, capsys):
    root, _ = make_voc(tmp_path)
    shutil.rmtree(root / "JPEGImages")
    shutil.rmtree(root / "ImageSets")
    assert prepare_voc(root) == 2
    err = capsys.readouterr().err
    assert "JPEGImages" in err and "ImageSets/Segmentation" in err
    assert prepare_voc(tmp_path / "nowhere") == 2
    assert "not a directory" in capsys.readouterr().err


def test_prepare_voc_bad_masks_and_lists(voc, capsys):
    root, entries = voc
    val = [n for n, e in entries.items() if e["split"] == "val"]
    train_aug = sorted(n for n, e in entries.items() if e["split"] == "train_aug")
    # a mask of another size, a mask holding 37, a list naming an image that is not there
    small = read_label_png(root / "SegmentationClassAug" / f"{train_aug[1]}.png")[:100, :120]
    save_label_png(root / "SegmentationClassAug" / f"{train_aug[1]}.png", small)
    bad = read_label_png(root / "SegmentationClassAug" / f"{val[0]}.png").copy()
    bad[:5, :5] = 37
    save_label_png(root / "SegmentationClassAug" / f"{val[0]}.png", bad)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join([*val, "2099_000001"]) + "\n")
    assert prepare_voc(root) == 1
    err = capsys.readouterr().err
    assert f"1 masks differ in size from their image (excluded from labels and splits): {train_aug[1]} " \
           f"(mask 120x100, image 500x375)" in err
    assert f"SegmentationClassAug/{val[0]}.png: 37" in err
    assert "val.txt names 1 images missing from JPEGImages: 2099_000001" in err
    index = load_index(root / "excelseg_index.json")  # written all the same, without the bad images
    assert train_aug[1] not in index["labels"] and val[0] not in index["labels"]
    assert index["splits"]["val"] == val[1:]
    assert train_aug[1] not in index["splits"]["train_aug"]
    assert set(index["excluded"]) == {train_aug[1], val[0], "2099_000001"}


# ------------------------------------------------------------------------------------------------------------
# datasets


def test_voc_dataset_samples(voc):
    root, entries = voc
    assert prepare_voc(root) == 0
    ds = open_dataset("voc", root, "val")
    assert isinstance(ds, SegDataset) and len(ds) == 2 and ds.num_classes == 20
    for s in ds:
        e = entries[s["name"]]
        assert s["image"].dtype == np.uint8 and s["image"].shape == (*e["size_hw"], 3)
        assert s["mask"].shape == tuple(e["size_hw"]) and s["size"] == tuple(e["size_hw"])
        assert s["label"].dtype == np.float32 and s["label"].shape == (20,)
        assert [i + 1 for i in np.flatnonzero(s["label"])] == e["class_ids"]
        assert np.array_equal(s["mask"], read_label_png(SAMPLE / e["mask"]))
    batch = collate([ds[0], ds[1]])
    assert isinstance(batch["image"], list) and batch["label"].shape == (2, 20)
    assert batch["label"].dtype == torch.float32
    no_mask = open_dataset("voc", root, "train_aug", with_mask=False)
    assert "mask" not in no_mask[0] and len(no_mask) == 3
    with pytest.raises(ValueError, match="split 'nope' is not in"):
        open_dataset("voc", root, "nope")
    with pytest.raises(ValueError, match="indexes a voc dataset, not coco"):
        open_dataset("coco", root, "val")
    with pytest.raises(FileNotFoundError, match="run 'excelseg prepare coco"):
        open_dataset("coco", root.parent, "val")


def test_dataloader_with_augmentation(voc):
    root, _ = voc
    assert prepare_voc(root) == 0
    ds = open_dataset("voc", root, "train_aug", transform=TrainAugmentation(rng=np.random.default_rng(0)))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fixed)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 320, 320, 3) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (3, 320, 320) and batch["label"].shape == (3, 20)
    assert len(batch["name"]) == 3

    def run():  # two workers, each reseeded from the loader's generator: reproducible, not replayed
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_fixed,
                                             worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(5))
        return [b["image"] for b in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_parallel_map_keeps_order():
    assert list(parallel_map(abs, range(-9, 0), workers=2, chunksize=2)) == list(range(9, 0, -1))


# ------------------------------------------------------------------------------------------------------------
# folder datasets


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for rel, (h, w) in {"a.jpg": (30, 40), "sub/b.png": (20, 25), "c.jpg": (16, 16)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / rel)
    return d


def test_folder_dataset_csv(photos, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,classes\na.jpg,dog;cat\n\n# a comment\nsub/b.png,Cat|person\nc.jpg,\n")
    ds = FolderDataset(photos, labels)
    assert ds.class_names == ("cat", "dog", "person") and ds.ids == ["a", "sub/b", "c"]
    s = ds[1]
    assert s["name"] == "sub/b" and s["image"].shape == (20, 25, 3) and "mask" not in s
    assert s["label"].tolist() == [1.0, 0.0, 1.0]
    assert ds[2]["label"].sum() == 0
    voc = FolderDataset(photos, labels, classes="voc")  # VOC names (and prompt names) accepted
    assert voc.num_classes == 20 and voc.class_ids("a") == [8, 12]


def test_folder_dataset_json_and_masks(photos, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.jpg": ["dog"], "c.jpg": "cat;dog"}, indent=1))
    masks = tmp_path / "masks"
    save_label_png(masks / "a.png", np.full((30, 40), 2, np.uint8))
    save_label_png(masks / "c.png", np.ones((16, 16), np.uint8))
    ds = FolderDataset(photos, labels, masks_dir=masks, classes=["cat", "dog", "bird"])
    assert ds.class_names == ("cat", "dog", "bird")
    assert ds.class_ids("a") == [2] and ds.class_ids("c") == [1, 2]
    assert (ds[0]["mask"] == 2).all()


def test_folder_unknown_classes_named_with_lines(photos, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg,dog;zebra\nc.jpg,cta\n")
    with pytest.raises(ValueError, match=r"'zebra' \(line 1\), 'cta' \(line 2\)"):
        FolderDataset(photos, labels, classes="cat,dog")
    js = tmp_path / "labels.json"
    js.write_text('{\n  "a.jpg": ["dog"],\n  "c.jpg": ["unicorn"]\n}\n')
    with pytest.raises(ValueError, match=r"'unicorn' \(line 3\)"):
        FolderDataset(photos, js, classes="voc")
    assert read_labels_file(js)[1] == ("c.jpg", ["unicorn"], 3)
    labels.write_text("a.jpg,dog\na.png,cat\n")
    with pytest.raises(ValueError, match="listed twice"):
        FolderDataset(photos, labels)
    labels.write_text("a.jpg,dog\nmissing.jpg,cat\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        FolderDataset(photos, labels)


def test_prepare_folder(photos, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg,dog\nsub/b.png,cat\n")
    masks = tmp_path / "masks"
    save_label_png(masks / "a.png", np.full((30, 40), 2, np.uint8))
    save_label_png(masks / "sub" / "b.png", np.full((21, 25), 1, np.uint8))  # wrong size
    out = tmp_path / "folder.json"
    rc = main(["prepare", "folder", str(photos), "--labels", str(labels), "--masks", str(masks),
               "--out", str(out), "--workers", "1"])
    assert rc == 1
    assert "sub/b (mask 25x21, image 25x20)" in capsys.readouterr().err
    index = load_index(out)
    assert index["splits"] == {"all": ["a"]} and index["labels"] == {"a": [2]}
    assert index["sizes"] == {"a": [30, 40]} and index["class_names"] == ["cat", "dog"]
    ds = open_dataset("folder", index=out)
    assert ds[0]["mask"].shape == (30, 40)
    rc = main(["prepare", "folder", str(photos), "--labels", str(labels), "--classes", "cat", "--out", str(out)])
    assert rc == 2 and "unknown class names 'dog' (line 1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# training augmentation


def _sample(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return {"name": "x", "image": rng.integers(1, 255, (h, w, 3), dtype=np.uint8),
            "mask": rng.integers(0, 3, (h, w), dtype=np.uint8), "label": np.ones(2, np.float32), "size": (h, w)}


def test_augmentation_shapes_and_determinism():
    s = _sample()
    a = TrainAugmentation(rng=np.random.default_rng(7))
    b = TrainAugmentation(rng=np.random.default_rng(7))
    outs_a = [a(s) for _ in range(4)]
    outs_b = [b(s) for _ in range(4)]
    for x, y in zip(outs_a, outs_b):
        assert x["image"].shape == (320, 320, 3) and x["mask"].shape == (320, 320)
        assert x["image"].dtype == np.uint8 and x["mask"].dtype == np.uint8
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])
        assert x["name"] == "x" and x["size"] == (60, 80)
    assert not np.array_equal(outs_a[0]["image"], outs_a[1]["image"])
    c = TrainAugmentation(rng=np.random.default_rng(8))(s)
    assert not np.array_equal(c["image"], outs_a[0]["image"])
    assert TrainAugmentation().gt_guided_crop is False
    assert np.array_equal(s["image"], _sample()["image"])  # input untouched


def test_augmentation_padding_values():
    s = _sample(50, 40)
    out = TrainAugmentation(scale_range=(1.0, 1.0), flip_prob=0.0, rng=np.random.default_rng(3))(s)
    content = out["mask"] != 255  # the sample's mask holds no 255: everything else is padding
    assert content.sum() == 50 * 40
    ys, xs = np.nonzero(content)
    assert np.ptp(ys) == 49 and np.ptp(xs) == 39  # one block
    assert (out["image"][~content] == 0).all() and (out["image"][content] > 0).all()
    block = out["image"][ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert np.array_equal(block, s["image"])


def test_augmentation_rescale_and_flip():
    s = _sample(100, 400)
    s["mask"][:] = 0
    s["mask"][:, :200] = 1  # left half class 1
    out = TrainAugmentation(crop_size=100, scale_range=(0.5, 0.5), flip_prob=1.0, rng=np.random.default_rng(0))(s)
    # 100×400 → 50×200 (padded to 100 high), flipped: class 1 now on the right
    m = out["mask"]
    valid = m != 255
    assert valid.sum() == 50 * 100
    row = m[np.nonzero(valid.any(axis=1))[0][0]]
    assert set(np.unique(m[valid])) <= {0, 1}
    cols = np.nonzero(row != 255)[0]
    assert (np.diff(row[cols].astype(int)) >= 0).all()  # 0s then 1s from left to right


def test_gt_guided_crop_is_an_explicit_option():
    s = _sample(960, 960)
    s["mask"][:] = 1
    s["mask"][280:680, 280:680] = 2
    ratio = []
    for seed in range(5):
        out = TrainAugmentation(scale_range=(1, 1), flip_prob=0, gt_guided_crop=True,
                                rng=np.random.default_rng(seed))(s)
        counts = np.bincount(out["mask"].reshape(-1))
        ratio.append(counts.max() / counts.sum())
    assert max(ratio) < 0.75
    with pytest.raises(ValueError, match="needs the GT mask"):
        TrainAugmentation(gt_guided_crop=True)({"image": s["image"]})
    assert "leaks pixel labels" in " ".join(TrainAugmentation.__doc__.split())
