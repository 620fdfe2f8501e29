"""`excelseg prepare coco` (mask rasterisation, lists, resume), `excelseg eval` and `excelseg eval-cams`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from excelseg.cli import main
from excelseg.commands.eval_cams import parse_thresholds
from excelseg.data import load_index, open_dataset
from excelseg.io.files import read_label_png, save_label_png, save_npz

H, W = 40, 50
CATEGORIES = [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]  # → cat 1, dog 2, bird 3


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"counts": counts, "size": list(mask.shape)}


def crowd_region() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[2:38, 30:48] = True
    return m


def coco_json(split: str, ids: list[int], anns: list[dict]) -> dict:
    images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "height": H, "width": W} for i in ids]
    for k, a in enumerate(anns):
        a.setdefault("id", k + 1)
        a.setdefault("iscrowd", 0)
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


@pytest.fixture()
def coco(tmp_path):
    pytest.importorskip("pycocotools")
    root = tmp_path / "coco"
    train_anns = [
        # image 1: a small dog on a large cat (listed first: area, not order, decides), a crowd of birds
        {"image_id": 1, "category_id": 7, "segmentation": rect(20, 10, 30, 20)},
        {"image_id": 1, "category_id": 3, "segmentation": rect(5, 5, 40, 35)},
        {"image_id": 1, "category_id": 12, "iscrowd": 1, "segmentation": uncompressed_rle(crowd_region())},
        # image 2: crowd only
        {"image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": uncompressed_rle(crowd_region())},
        # image 4: a polygon partly outside the image
        {"image_id": 4, "category_id": 12, "segmentation": rect(30, 20, 80, 70)},
    ]  # image 3: no annotation
    val_anns = [{"image_id": 9, "category_id": 7, "segmentation": rect(0, 0, 10, 10)},
                {"image_id": 8, "category_id": 3, "segmentation": rect(0, 0, 10, 10)}]
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    (ann_dir / "instances_train2014.json").write_text(json.dumps(coco_json("train", [1, 2, 3, 4], train_anns)))
    (ann_dir / "instances_val2014.json").write_text(json.dumps(coco_json("val", [9, 8, 7], val_anns)))
    img = Image.new("RGB", (W, H), (90, 120, 150))
    for split, folder, ids in (("train", "train2014", [1, 2, 3, 4]), ("val", "JPEGImages/val", [7, 8, 9])):
        (root / folder).mkdir(parents=True)
        for i in ids:
            img.save(root / folder / f"COCO_{split}2014_{i:012d}.jpg")
    return root, ann_dir


def prepare_coco(root, ann_dir, *extra):
    return main(["prepare", "--dataset", "coco", "--root", str(root), "--annotations", str(ann_dir / "instances_train2014.json"),
                 "--annotations", str(ann_dir / "instances_val2014.json"), "--workers", "1", *map(str, extra)])


def decode(segm) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(segm, H, W)
    return mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle).astype(bool)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
def test_prepare_coco_masks_and_index(coco, capsys):
    root, ann_dir = coco
    assert prepare_coco(root, ann_dir, "--val-part", "1", "--workers", "2") == 0  # in a process pool
    out = capsys.readouterr().out
    assert "1 images without annotations" in out
    masks = root / "SegmentationClass"
    m1 = read_label_png(masks / "train" / "000000000001.png")
    cat, dog, crowd = decode(rect(5, 5, 40, 35)), decode(rect(20, 10, 30, 20)), crowd_region()
    assert (m1[dog] == 2).all()  # the smaller instance on top
    assert (m1[cat & ~dog] == 1).all()
    assert (m1[crowd & ~cat & ~dog] == 255).all()  # crowd = ignore where no instance covers it
    assert (m1[~(cat | dog | crowd)] == 0).all()
    assert (m1[crowd & cat & ~dog] == 1).any()
    m2 = read_label_png(masks / "train" / "000000000002.png")
    assert np.array_equal(m2 == 255, crowd) and (m2[~crowd] == 0).all()
    assert (read_label_png(masks / "train" / "000000000003.png") == 0).all()
    m4 = read_label_png(masks / "train" / "000000000004.png")
    assert m4.shape == (H, W) and (m4[22:, 32:] == 3).all() and (m4[:18] == 0).all()  # clipped at the border

    index = load_index(root / "excelseg_index.json")
    assert index["class_names"] == ["cat", "dog", "bird"]
    assert index["splits"]["train"] == ["000000000001", "000000000002", "000000000004"]
    assert index["splits"]["val"] == ["000000000008", "000000000009"]  # sorted by id; 7 has no annotation
    assert index["splits"]["val_part"] == ["000000000008"]
    # image-level labels: every annotated category, crowd included (the crowd birds of 1, the crowd cats of 2)
    assert index["labels"]["000000000001"] == [1, 2, 3] and index["labels"]["000000000002"] == [1]
    assert index["labels"]["000000000004"] == [3] and index["sizes"]["000000000004"] == [H, W]
    assert index["info"]["label_source"]["train"].startswith("annotations")
    assert index["info"]["label_disagreements"]["train"] == {
        "not_in_mask": {"000000000001": [3], "000000000002": [1]}, "not_in_annotations": {}}
    assert ("train: image-level labels from the annotated categories; annotated categories differ from mask "
            "classes on 2 of 3 listed images: 2 with annotated categories not visible in the mask") in out
    assert "000000000001: bird" in out
    assert "val: image-level labels from the annotated categories; annotated categories and mask classes agree " \
           "on all 2 listed images" in out
    assert index["info"]["image_layout"] == {"train": "train2014", "val": "JPEGImages/val"}
    assert index["info"]["without_annotations"] == {"train": 1, "val": 1}
    ds = open_dataset("coco", root, "train")
    s = ds[0]
    assert s["name"] == "000000000001" and s["image"].shape == (H, W, 3)
    assert np.array_equal(s["mask"], m1) and s["label"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_prepare_coco_labels_from_mask(coco, capsys):
    root, ann_dir = coco
    assert prepare_coco(root, ann_dir, "--labels-from", "mask") == 0
    out = capsys.readouterr().out
    assert "train: image-level labels from the mask classes; annotated categories differ from mask classes " \
           "on 2 of 3 listed images" in out
    index = load_index(root / "excelseg_index.json")
    # the crowd birds of 1 are 255 where no instance covers them, the cats of 2 are crowd only: not labels
    assert index["labels"]["000000000001"] == [1, 2] and index["labels"]["000000000002"] == []
    assert index["info"]["label_source"]["train"].startswith("masks")
    assert open_dataset("coco", root, "train")[0]["label"].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_prepare_coco_labels_file(coco, tmp_path, capsys):
    """A cls_labels_onehot.npy keyed by full COCO names (the reference's loader) overrides the listed images."""
    root, ann_dir = coco
    np.save(tmp_path / "cls_labels_onehot.npy", {"COCO_train2014_000000000004": np.array([1, 0, 1], np.float32),
                                                 "COCO_val2014_000000000009": np.array([0, 1, 0], np.float32)})
    assert prepare_coco(root, ann_dir, "--labels", tmp_path / "cls_labels_onehot.npy") == 0
    out = capsys.readouterr().out
    assert "1 of 3 listed images labelled from it; it differs from the annotated categories on 1" in out
    assert "1 of 2 listed images labelled from it; it differs from the annotated categories on 0" in out
    index = load_index(root / "excelseg_index.json")
    assert index["labels"]["000000000004"] == [1, 3] and index["labels"]["000000000001"] == [1, 2, 3]
    assert index["info"]["label_source"]["train"].startswith("labels file (1 images), else annotations")
    np.save(tmp_path / "wrong.npy", {"COCO_train2014_000000000004": np.ones(20, np.float32)})
    assert prepare_coco(root, ann_dir, "--labels", tmp_path / "wrong.npy") == 2
    assert "expected (3,)" in capsys.readouterr().err


def test_prepare_coco_resume_and_interrupted_run(coco, capsys):
    root, ann_dir = coco
    assert prepare_coco(root, ann_dir) == 0
    train = root / "SegmentationClass" / "train"
    good = (train / "000000000001.png").stat().st_mtime_ns
    before = read_label_png(train / "000000000002.png")
    # what a killed run can leave: a temporary file of the atomic writer, and a truncated mask from another tool
    (train / ".000000000003.png.abc123.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    data = (train / "000000000002.png").read_bytes()
    (train / "000000000002.png").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert prepare_coco(root, ann_dir) == 0
    out = capsys.readouterr().out
    assert "train: 4 images; masks 3 kept, 1 replaced" in out
    assert "removed 1 temporary files" in out
    assert (train / "000000000001.png").stat().st_mtime_ns == good  # finished masks are not redone
    assert np.array_equal(read_label_png(train / "000000000002.png"), before)
    assert not [p.name for p in train.iterdir() if p.name.startswith(".") or not p.name.endswith(".png")]
    assert prepare_coco(root, ann_dir, "--overwrite") == 0
    assert "4 overwritten" in capsys.readouterr().out


def test_prepare_coco_one_split_at_a_time_and_out_masks(coco, tmp_path, capsys):
    root, ann_dir = coco
    out_masks = tmp_path / "elsewhere"
    for split in ("train", "val"):
        rc = main(["prepare", "--dataset", "coco", "--root", str(root), "--annotations", str(ann_dir / f"instances_{split}2014.json"),
                   "--out-masks", str(out_masks), "--workers", "1"])
        assert rc == 0
    index = load_index(root / "excelseg_index.json")
    assert set(index["splits"]) == {"train", "val", "val_part"}  # the second run kept the first one's split
    assert (out_masks / "val" / "000000000009.png").is_file()
    assert open_dataset("coco", root, "val")[1]["mask"].max() == 2


def test_prepare_coco_without_pycocotools(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    rc = main(["prepare", "--dataset", "coco", "--root", str(tmp_path), "--annotations", str(tmp_path / "a.json")])
    assert rc == 2
    assert "install the coco extra: pip install 'excelseg[coco]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# eval


@pytest.fixture()
def tiny(tmp_path):
    """A folder dataset: two 10×10 images, classes a, b; GT rows 0-1 background, 2-5 class a, 6-9 class b
    (row 9 of image x = 255)."""
    images, masks, preds = tmp_path / "images", tmp_path / "masks", tmp_path / "preds"
    images.mkdir()
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6] = 1
    gt[6:] = 2
    for name in ("x", "y"):
        Image.new("RGB", (10, 10)).save(images / f"{name}.png")
        g = gt.copy()
        if name == "x":
            g[9] = 255
        save_label_png(masks / f"{name}.png", g)
    (tmp_path / "labels.csv").write_text("x.png,a;b\ny.png,a;b\n")
    index = tmp_path / "index.json"
    assert main(["prepare", "--dataset", "folder", "--root", str(images), "--labels", str(tmp_path / "labels.csv"), "--masks", str(masks),
                 "--out", str(index), "--workers", "1"]) == 0
    return index, masks, preds


def run_eval(index, preds, *extra):
    return main(["eval", "--pred", str(preds), "--dataset", "folder", "--index", str(index), "--workers", "1",
                 *map(str, extra)])


def test_eval_perfect_and_known_confusion(tiny, capsys):
    index, masks, preds = tiny
    for name in ("x", "y"):
        save_label_png(preds / f"{name}.png", read_label_png(masks / f"{name}.png"))  # 255 where GT ignores
    assert run_eval(index, preds) == 0
    result = json.loads((preds / "metrics.json").read_text())
    assert result["miou"] == 1.0 and result["evaluated"] == 2 and result["missing"] == 0
    assert "mIoU (3/3 classes present in GT): 100.00" in capsys.readouterr().out

    # image x: row 5 (class a) predicted b, the ignored row 9 predicted a; image y exact
    p = read_label_png(masks / "x.png").copy()
    p[5] = 2
    p[9] = 1
    save_label_png(preds / "x.png", p)
    out = preds.parent / "m.json"
    assert run_eval(index, preds, "--out", out) == 0
    r = json.loads(out.read_text())
    # background 40/40; a: 70 of 80 right, b gains 10 → IoU a = 70/80, IoU b = 70/(70 + 80 - 70)
    assert r["iou"] == pytest.approx([1.0, 70 / 80, 70 / 80])
    assert r["miou"] == pytest.approx((1 + 70 / 80 + 70 / 80) / 3)
    assert r["pixel_accuracy"] == pytest.approx(180 / 190)
    assert r["recall"][1] == pytest.approx(70 / 80) and r["precision"][2] == pytest.approx(70 / 80)
    assert r["confusion"][1] == [0, 70, 10] and r["pixels"] == 190


def test_eval_refuses_bad_predictions(tiny, capsys):
    index, masks, preds = tiny
    save_label_png(preds / "x.png", read_label_png(masks / "x.png"))
    save_label_png(preds / "y.png", np.zeros((10, 11), np.uint8))
    assert run_eval(index, preds) == 2
    assert f"prediction {preds / 'y.png'} is 11x10 but its ground truth" in capsys.readouterr().err
    bad = np.zeros((10, 10), np.uint8)
    bad[0, 0] = 7
    save_label_png(preds / "y.png", bad)
    assert run_eval(index, preds) == 2
    assert f"prediction {preds / 'y.png'} has label values 7 outside 0-2 and 255" in capsys.readouterr().err
    bad[0, 0] = 255  # ignore where the GT has a class
    save_label_png(preds / "y.png", bad)
    assert run_eval(index, preds) == 2
    assert "1 pixels of value 255" in capsys.readouterr().err


def test_eval_missing_predictions(tiny, capsys):
    index, masks, preds = tiny
    save_label_png(preds / "x.png", read_label_png(masks / "x.png"))
    assert run_eval(index, preds) == 2
    err = capsys.readouterr().err
    assert "1 of 2 predictions missing" in err and ": y;" in err and "--allow-missing" in err
    assert run_eval(index, preds, "--allow-missing") == 0
    assert "1 without a prediction skipped" in capsys.readouterr().out
    r = json.loads((preds / "metrics.json").read_text())
    assert r["evaluated"] == 1 and r["missing"] == 1 and r["missing_ids"] == ["y"] and r["miou"] == 1.0


def test_eval_voc_end_to_end(tmp_path, capsys):
    from test_data import make_voc

    root, entries = make_voc(tmp_path)
    assert main(["prepare", "--dataset", "voc", "--root", str(root), "--workers", "1"]) == 0
    preds = tmp_path / "preds"
    val = [n for n, e in entries.items() if e["split"] == "val"]
    for name in val:
        save_label_png(preds / f"{name}.png", read_label_png(root / "SegmentationClass" / f"{name}.png"))
    assert main(["eval", "--pred", str(preds), "--root", str(tmp_path), "--split", "val"]) == 0
    r = json.loads((preds / "metrics.json").read_text())
    assert r["miou"] == 1.0 and r["evaluated"] == len(val) and r["dataset"] == "voc" and r["split"] == "val"
    assert "mean IoU over all 21 classes" in capsys.readouterr().out  # few classes present: shown apart


# ------------------------------------------------------------------------------------------------------------
# eval-cams


def test_parse_thresholds():
    assert parse_thresholds("0.3:0.7:0.05") == pytest.approx([0.3 + 0.05 * i for i in range(9)])
    assert parse_thresholds("0.45") == [0.45] and parse_thresholds("0.2,0.4") == [0.2, 0.4]
    for bad in ("0.7:0.3:0.1", "x", "1.5"):
        with pytest.raises(Exception, match="threshold|range"):
            parse_thresholds(bad)


def test_eval_cams_picks_the_constructed_threshold(tiny, tmp_path, capsys):
    index, masks, _ = tiny
    cams_dir = tmp_path / "cams"
    rng = np.random.default_rng(0)
    for name in ("x", "y"):
        gt = read_label_png(masks / f"{name}.png")
        cams = np.zeros((2, 10, 10), np.float32)
        for k, cls in enumerate((1, 2)):
            inside = gt == cls
            # the class's own pixels score in [0.52, 0.65], all others at most 0.49: only 0.5 separates them all
            cams[k] = np.where(inside, rng.uniform(0.52, 0.65, (10, 10)), rng.uniform(0.3, 0.49, (10, 10)))
        cams[0][gt == 2] = 0.0  # the other class's CAM stays below the true one
        cams[1][gt == 1] = 0.0
        save_npz(cams_dir / f"{name}_cams.npz", cams=cams.astype(np.float16), class_ids=np.array([1, 2]))
    rc = main(["eval-cams", "--cams", str(cams_dir), "--dataset", "folder", "--index", str(index), "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best: mIoU 100.00 at background threshold 0.5 " in out
    r = json.loads((cams_dir / "cam_metrics.json").read_text())
    assert r["best_threshold"] == 0.5 and r["best_miou"] == 1.0 and len(r["thresholds"]) == 9
    assert all(m < 1.0 for t, m in zip(r["thresholds"], r["miou"]) if t != 0.5)
    assert r["miou"] == sorted(r["miou"][:5]) + sorted(r["miou"][5:], reverse=True)  # rises, then falls

    np.savez(cams_dir / "y_cams.npz", cams=np.zeros((2, 9, 10), np.float16), class_ids=np.array([1, 2]))
    rc = main(["eval-cams", "--cams", str(cams_dir), "--dataset", "folder", "--index", str(index),
               "--split", "all", "--workers", "1"])
    assert rc == 2 and "y_cams.npz is 10x9 but its ground truth is 10x10" in capsys.readouterr().err


def test_eval_cams_uses_only_the_gt_classes(tiny, tmp_path):
    _, masks, _ = tiny
    labels = tmp_path / "only_a.csv"
    labels.write_text("x.png,a\ny.png,a;b\n")  # x's mask also has b: its b CAM is dropped by default
    index_a = tmp_path / "index_a.json"
    assert main(["prepare", "--dataset", "folder", "--root", str(tmp_path / "images"), "--labels", str(labels), "--masks", str(masks),
                 "--out", str(index_a), "--workers", "1"]) == 0
    cams_dir = tmp_path / "cams"
    for name in ("x", "y"):
        gt = read_label_png(masks / f"{name}.png")
        cams = np.stack([(gt == 1) * 0.9, (gt == 2) * 0.9]).astype(np.float16)
        save_npz(cams_dir / f"{name}_cams.npz", cams=cams, class_ids=np.array([1, 2]))
    args = ["eval-cams", "--cams", str(cams_dir), "--dataset", "folder", "--index", str(index_a),
            "--bg-threshold", "0.5", "--workers", "1"]
    assert main(args) == 0
    r = json.loads((cams_dir / "cam_metrics.json").read_text())
    assert r["gt_labels"] and r["best"]["confusion"][2] == [30, 0, 40]  # x's 30 b pixels become background
    assert main([*args, "--no-gt-labels"]) == 0
    assert json.loads((cams_dir / "cam_metrics.json").read_text())["best_miou"] == 1.0


def test_eval_variant_rows_and_mean_std_over_runs(tiny, tmp_path, capsys):
    """Segment's variants (_ss, plain, _crf) become rows; several folders are summarised as mean ± sample std.
    Expected IoUs by hand: GT per image = 20 bg, 40 a, 40 b pixels (x: 10 b pixels ignored)."""
    index, masks, _ = tiny
    gt = {n: read_label_png(masks / f"{n}.png") for n in ("x", "y")}
    runs = []
    for k in range(2):
        d = tmp_path / f"run{k}"
        d.mkdir()
        (d / "excelseg_config.yaml").write_text("# command: segment\n")
        for name, g in gt.items():
            perfect = np.where(g == 255, 0, g).astype(np.uint8)
            save_label_png(d / f"{name}.png", perfect)  # MS+flip: perfect
            ss = perfect.copy()
            ss[2:6] = 0 if k == 0 else 1  # run 0: class a predicted as background
            save_label_png(d / f"{name}_ss.png", ss)
            save_label_png(d / f"{name}_crf.png", perfect)
        runs.append(d)
    assert main(["eval", "--pred", *map(str, runs), "--dataset", "folder", "--index", str(index), "--workers", "1",
                 "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    # run 0 single-scale: bg IoU = 40/(40+80)... per class: bg tp 40 (2 images × 20), fp 80 (a) → 1/3; a 0; b 1
    miou0 = (1 / 3 + 0 + 1) / 3
    mean, std = (miou0 + 1) / 2, float(np.std([miou0, 1.0], ddof=1))
    assert f"single-scale  mIoU {100 * mean:.2f} ± {100 * std:.2f}  (2 runs)" in out
    assert "MS+flip       mIoU 100.00 ± 0.00" in out and "+CRF          mIoU 100.00 ± 0.00" in out
    result = json.loads((tmp_path / "m.json").read_text())
    assert len(result["runs"]) == 6 and abs(result["summary"]["single-scale"]["miou_mean"] - mean) < 1e-9
