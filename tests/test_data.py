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
from excelseg.io.files import read_label_png, save_label_png
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
    return main(["prepare", "--dataset", "voc", "--root", str(path), "--workers", "1", *map(str, extra)])


# ------------------------------------------------------------------------------------------------------------
# prepare voc


def test_prepare_voc_labels_and_splits(voc, capsys):
    root, entries = voc
    rc = main(["prepare", "--dataset", "voc", "--root", str(root.parent.parent), "--workers", "2"])  # the folder holding VOCdevkit
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
    rc = main(["prepare", "--dataset", "folder", "--root", str(photos), "--labels", str(labels), "--masks", str(masks),
               "--out", str(out), "--workers", "1"])
    assert rc == 1
    assert "sub/b (mask 25x21, image 25x20)" in capsys.readouterr().err
    index = load_index(out)
    assert index["splits"] == {"all": ["a"]} and index["labels"] == {"a": [2]}
    assert index["sizes"] == {"a": [30, 40]} and index["class_names"] == ["cat", "dog"]
    ds = open_dataset("folder", index=out)
    assert ds[0]["mask"].shape == (30, 40)
    rc = main(["prepare", "--dataset", "folder", "--root", str(photos), "--labels", str(labels), "--classes", "cat", "--out", str(out)])
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


# ------------------------------------------------------------------------------------------------------------
# image-level labels: VOC XML annotations, ready-made label files


def _xml_object(name: str, extra: str = "") -> str:
    return f"<object><name>{name}</name><pose>Left</pose>{extra}<bndbox><xmin>1</xmin></bndbox></object>"


def _xml(*objects: str) -> str:
    return "<annotation><folder>VOC2012</folder><filename>x.jpg</filename>" + "".join(objects) + "</annotation>"


def add_annotations(root: Path) -> None:
    """Annotations/ for the sample tree: 2007_000129 repeated / difficult objects, a part named like a class
    and an unknown class; 2007_001763 one more (difficult, truncated) class than its mask; 2011_000003 no XML;
    2011_000006 malformed XML; 2011_000025 a class fewer than its mask (car)."""
    ann = root / "Annotations"
    ann.mkdir()
    parts = "<difficult>1</difficult><part><name>head</name></part><part><name>dog</name></part>"
    (ann / "2007_000129.xml").write_text(_xml(
        _xml_object("bicycle"), _xml_object("person"), _xml_object("person", parts), _xml_object("zebra")))
    (ann / "2007_001763.xml").write_text(_xml(
        *[_xml_object(n) for n in ("cat", "dog", "sofa", "tvmonitor")],
        _xml_object("pottedplant", "<truncated>1</truncated><difficult>1</difficult>")))
    (ann / "2011_000006.xml").write_text("<annotation><object><name>chair</name></annotation>")
    (ann / "2011_000025.xml").write_text(_xml(_xml_object(" bus\n")))


def test_prepare_voc_labels_from_annotations(voc, capsys):
    root, entries = voc
    if set(entries) != {"2007_000129", "2007_001763", "2011_000003", "2011_000006", "2011_000025"}:
        pytest.skip("the VOC sample changed; this test names its images")
    add_annotations(root)
    assert prepare_voc(root) == 1  # the malformed XML and the unknown class are problems
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    index = load_index(root / "excelseg_index.json")
    bicycle, person, cat, dog, plant, sofa, tv, bus, car = (
        VOC_CLASSES.index(n) + 1 for n in ("bicycle", "person", "cat", "dog", "pottedplant", "sofa", "tvmonitor",
                                           "bus", "car"))
    assert index["labels"]["2007_000129"] == [bicycle, person]  # repeats once, difficult kept, parts ignored
    assert index["labels"]["2007_001763"] == [cat, dog, plant, sofa, tv]  # difficult + truncated counted
    assert index["labels"]["2011_000025"] == [bus]  # the annotation wins over the mask's car
    assert index["labels"]["2011_000003"] == entries["2011_000003"]["class_ids"]  # no XML: its mask
    assert index["labels"]["2011_000006"] == entries["2011_000006"]["class_ids"]  # malformed: its mask
    assert "1 annotation XMLs are unusable (those images' labels come from their masks): " \
           "Annotations/2011_000006.xml (not well-formed XML" in err
    assert "name objects outside the 20 VOC classes (ignored): 'zebra' (2007_000129)" in err
    assert "1 images have no Annotations/<id>.xml: their labels come from their masks (2011_000003)" in out
    assert "image-level labels: 3 from Annotations/*.xml, 2 from the masks; by split: train masks, " \
           "val annotations, train_aug mixed (annotations 1, masks 2)" in out
    assert "annotation labels differ from mask classes on 2 of 3 images (val 1, train_aug 1): 1 with annotation " \
           "classes absent from the mask (2007_001763: pottedplant); 1 with mask classes absent from the " \
           "annotation (2011_000025: car)" in out
    info = index["info"]
    assert info["label_source"] == {"train": "masks", "val": "annotations",
                                     "train_aug": "mixed (annotations 1, masks 2)"}
    assert info["labels_from_masks"] == ["2011_000003", "2011_000006"]
    assert info["label_disagreements"]["annotations_vs_masks"] == {
        "not_in_mask": {"2007_001763": [plant]}, "not_in_annotation": {"2011_000025": [car]}}
    # the training data path reads these labels
    s = open_dataset("voc", root, "val", transform=TrainAugmentation(rng=np.random.default_rng(0)))[1]
    assert s["name"] == "2007_001763" and [i + 1 for i in np.flatnonzero(s["label"])] == [cat, dog, plant, sofa, tv]

    assert prepare_voc(root, "--labels-from", "mask") == 1
    out = capsys.readouterr().out
    assert "labels taken from the masks (--labels-from mask)" in out
    assert "annotation labels differ from mask classes on 2 of 3 images" in out  # reported all the same
    index = load_index(root / "excelseg_index.json")
    assert index["labels"] == {n: e["class_ids"] for n, e in entries.items()}
    assert set(index["info"]["label_source"].values()) == {"masks"}


def test_prepare_voc_every_annotation_agrees(voc, capsys):
    """A complete Annotations/ folder: labels = the annotations' classes for every image, all from the XMLs."""
    root, entries = voc
    (root / "Annotations").mkdir()
    for name, e in entries.items():
        (root / "Annotations" / f"{name}.xml").write_text(_xml(*[_xml_object(c) for c in e["classes"]]))
    assert prepare_voc(root) == 0
    out = capsys.readouterr().out
    assert f"image-level labels: {len(entries)} from Annotations/*.xml;" in out
    assert f"annotation labels and mask classes agree on all {len(entries)} images" in out
    index = load_index(root / "excelseg_index.json")
    assert index["labels"] == {n: e["class_ids"] for n, e in entries.items()}
    assert set(index["info"]["label_source"].values()) == {"annotations"}
    assert "labels_from_masks" not in index["info"]


def test_prepare_voc_without_annotations_says_so(voc, capsys):
    root, entries = voc
    assert prepare_voc(root) == 0
    out = capsys.readouterr().out
    assert f"Annotations/ not found: the labels of {len(entries)} images come from their masks" in out
    index = load_index(root / "excelseg_index.json")
    assert set(index["info"]["label_source"].values()) == {"masks"}


def test_read_voc_annotation_refuses_entities(tmp_path):
    from excelseg.data.labels import read_voc_annotation

    p = tmp_path / "a.xml"
    p.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                 "<annotation><object><name>&e;</name></object></annotation>")
    with pytest.raises(ValueError, match="DTD or entities"):
        read_voc_annotation(p, VOC_CLASSES)
    p.write_bytes(p.read_text().replace("<?xml version=\"1.0\"?>", "").encode("utf-16"))
    with pytest.raises(ValueError, match="UTF-16 and UTF-32 are refused"):
        read_voc_annotation(p, VOC_CLASSES)
    p.write_text("<annotation><object><difficult>0</difficult></object></annotation>")
    with pytest.raises(ValueError, match="has no <name>"):
        read_voc_annotation(p, VOC_CLASSES)
    p.write_text(_xml(_xml_object("Dog"), _xml_object("cat", "<part><name>person</name></part>")))
    assert read_voc_annotation(p, VOC_CLASSES) == ([8, 12], [])


def _vector(*names: str) -> np.ndarray:
    v = np.zeros(20, np.float32)
    for n in names:
        v[VOC_CLASSES.index(n)] = 1
    return v


def test_prepare_voc_labels_file_onehot_npy(voc, tmp_path, capsys):
    """The reference's cls_labels_onehot.npy layout: np.save(path, {id: float32 (20,) vector})."""
    root, entries = voc
    labels = {n: _vector(*e["classes"]) for n, e in entries.items()}
    labels["2011_000025"] = _vector("bus", "car", "person")  # a person the mask does not show
    labels["2099_000001"] = _vector("cat")  # not in this dataset
    np.save(tmp_path / "cls_labels_onehot.npy", labels)
    assert prepare_voc(root, "--labels", tmp_path / "cls_labels_onehot.npy") == 0
    out = capsys.readouterr().out
    assert "image-level labels: 5 from the labels file; by split: train labels file" in out
    assert "5 of 5 images labelled from it; 1 of its entries are not images of this dataset with a mask " \
           "(2099_000001)" in out
    assert "labels file labels differ from mask classes on 1 of 5 images (train_aug 1): 1 with labels file " \
           "classes absent from the mask (2011_000025: person)" in out
    index = load_index(root / "excelseg_index.json")
    assert index["labels"]["2011_000025"] == [6, 7, 15]
    assert index["info"]["labels_file"] == str((tmp_path / "cls_labels_onehot.npy").resolve())
    assert set(index["info"]["label_source"].values()) == {"labels file"}
    ds = open_dataset("voc", root, "train_aug")
    assert ds.label("2011_000025").tolist() == labels["2011_000025"].tolist()


def test_prepare_voc_labels_file_irn_npy_and_csv(voc, tmp_path, capsys):
    """cls_labels.npy as IRN writes it (integer ids 2007000129 → vectors) and the CSV of prepare folder."""
    root, entries = voc
    irn = {np.int32(int(n.replace("_", ""))): _vector(*e["classes"]) for n, e in entries.items()}
    np.save(tmp_path / "cls_labels.npy", irn)
    assert prepare_voc(root, "--labels", tmp_path / "cls_labels.npy") == 0
    assert load_index(root / "excelseg_index.json")["labels"] == {n: e["class_ids"] for n, e in entries.items()}
    csv = tmp_path / "labels.csv"
    csv.write_text("image,classes\n2007_000129.jpg,Bicycle;person\n2011_000025,bus\n")
    capsys.readouterr()
    assert prepare_voc(root, "--labels", csv) == 0
    out = capsys.readouterr().out
    assert "2 of 5 images labelled from it; 3 not in it" in out
    index = load_index(root / "excelseg_index.json")
    assert index["labels"]["2007_000129"] == [2, 15] and index["labels"]["2011_000025"] == [6]
    assert index["info"]["label_source"]["train_aug"] == "mixed (labels file 1, masks 2)"
    csv.write_text("2007_000129.jpg,bicycle;unicorn\n")
    assert prepare_voc(root, "--labels", csv) == 2
    assert "unknown class names 'unicorn' (line 1)" in capsys.readouterr().err


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_labels_file_refuses_unsafe_and_wrong_pickles(voc, tmp_path, capsys):
    from excelseg.data.labels import LabelFileError, read_label_file, read_npy_dict

    root, _ = voc
    marker = tmp_path / "PWNED"
    np.save(tmp_path / "evil.npy", {"2007_000129": _Evil(marker)}, allow_pickle=True)
    with pytest.raises(LabelFileError, match=r"refused to load (posix|os|nt)\.system"):
        read_npy_dict(tmp_path / "evil.npy")
    assert prepare_voc(root, "--labels", tmp_path / "evil.npy") == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()

    not_dict = np.empty((), dtype=object)
    not_dict[()] = ["2007_000129", [1, 0]]
    np.save(tmp_path / "list.npy", not_dict)
    with pytest.raises(LabelFileError, match="holds a list, not a dict"):
        read_label_file(tmp_path / "list.npy", VOC_CLASSES)
    np.save(tmp_path / "array.npy", np.zeros((3, 20), np.float32))
    with pytest.raises(LabelFileError, match=r"float32 array of shape \(3, 20\), not a dict"):
        read_label_file(tmp_path / "array.npy", VOC_CLASSES)
    np.save(tmp_path / "short.npy", {"2007_000129": np.ones(19, np.float32)})
    with pytest.raises(LabelFileError, match=r"shape \(19,\); expected \(20,\)"):
        read_label_file(tmp_path / "short.npy", VOC_CLASSES)
    np.save(tmp_path / "text.npy", {"2007_000129": "cat"})
    with pytest.raises(LabelFileError, match="not a numeric vector"):
        read_label_file(tmp_path / "text.npy", VOC_CLASSES)
    (tmp_path / "bad.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(LabelFileError, match="not a valid .npy file"):
        read_label_file(tmp_path / "bad.npy", VOC_CLASSES)
