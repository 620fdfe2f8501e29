"""Checkpoints (heads + config + class list + CLIP identity), Segmenter, `excelseg segment`, `cam --checkpoint`,
on tiny random CLIPs; bad checkpoints and odd images."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.cli import main
from excelseg.config import apply_overrides, load_config
from excelseg.heads import ExcelHeads
from excelseg.io.checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_checkpoint,
    same_clip,
    save_checkpoint,
    save_heads,
)
from numerics import F32_REL, assert_rel_close, rel_err
from tiny_clip import save_tiny

CLASSES = ["cat", "dog"]
# tiny geometry: 6-block width-64 ViT, patch 16, 64 px input; small heads so the CPU tests stay fast
CFG = apply_overrides(load_config("voc"), ["cam.size=64", "heads.dim=32", "heads.decoder_heads=2"])


def tiny_heads(seed: int = 0) -> ExcelHeads:
    torch.manual_seed(seed)
    heads = ExcelHeads(len(CLASSES) + 1, 6, 64, dim=32, heads=2)
    with torch.no_grad():  # spread the classifier so the argmax is not one class everywhere
        heads.decoder.classifier.weight.mul_(20)
    return heads.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("w") / "tiny.pt", layers=6, patch=16, image=64, heads=1)


@pytest.fixture(scope="module")
def clip(weights):
    from excelseg import load_clip

    return load_clip(weights, device="cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, clip):
    path = tmp_path_factory.mktemp("c") / "heads.safetensors"
    save_checkpoint(path, tiny_heads().state_dict(), class_names=CLASSES, clip_identity=clip.identity, config=CFG)
    return path


def photo(h=60, w=80, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 3] = (200, 40, 40)
    img[h // 2:, w // 3:] = (30, 60, 210)
    return np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)


# ---- checkpoint format ----------------------------------------------------------------------------------------


def test_checkpoint_round_trip(ckpt, clip):
    c = load_checkpoint(ckpt)
    assert c.class_names == CLASSES and c.clip_identity == clip.identity and c.config == CFG
    ref = tiny_heads().state_dict()
    assert set(c.state) == set(ref) and all(torch.equal(c.state[k], v) for k, v in ref.items())
    heads = c.heads()
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), ref.values()))
    assert not heads.training
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:  # only the trainable parts are stored
        assert all(k.startswith(("adapter.", "decoder.")) for k in f.keys())  # noqa: SIM118
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == CLASSES and json.loads(meta["config"])["cam"]["size"] == [64, 64]


def test_checkpoint_refuses_other_clip_and_other_classes(ckpt, clip):
    c = load_checkpoint(ckpt)
    check_checkpoint(c, clip.identity, CLASSES)  # the right ones pass
    with pytest.raises(CheckpointError, match=r"made with CLIP sha256:.* but the CLIP in use is ViT-B-16:openai"):
        check_checkpoint(c, "ViT-B-16:openai")
    with pytest.raises(CheckpointError, match="not in the checkpoint: bird; missing here: dog"):
        check_checkpoint(c, class_names=["cat", "bird"])
    with pytest.raises(CheckpointError, match="another order"):
        check_checkpoint(c, class_names=["dog", "cat"])
    with pytest.raises(CheckpointError, match="missing here: dog"):
        check_checkpoint(c, class_names=["cat"])
    with pytest.raises(ValueError, match="3 outputs but 3 class names"):
        save_checkpoint(ckpt.parent / "x.safetensors", tiny_heads().state_dict(), class_names=["a", "b", "c"],
                        clip_identity="x")


def test_openai_file_and_tag_are_the_same_clip():
    from excelseg.weights import KNOWN_FILES

    assert same_clip(f"sha256:{KNOWN_FILES['ViT-B-16.pt']}", "ViT-B-16:openai")
    assert not same_clip(f"sha256:{KNOWN_FILES['ViT-B-32.pt']}", "ViT-B-16:openai")
    assert not same_clip("sha256:00", "sha256:01")


def test_bad_checkpoint_files(tmp_path, ckpt):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(truncated)
    evil = tmp_path / "evil.pth"  # a pickle that would need code: never unpickled
    torch.save({"decoder.linear_pred.weight": torch.zeros(1), "x": argparse.Namespace(lr=1)}, evil)
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*import-checkpoint"):
        load_checkpoint(evil)
    bare = tmp_path / "bare.safetensors"  # a heads file without class list / CLIP identity
    save_heads(bare, tiny_heads().state_dict())
    with pytest.raises(CheckpointError, match="lacks class_names, clip_identity, config"):
        load_checkpoint(bare)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_import_checkpoint_records_classes_and_clip(tmp_path, capsys, weights, clip):
    from safetensors.torch import save_file

    from excelseg.heads import reference_key_map

    ref = {r: ExcelHeads(21).state_dict()[o] for r, o in reference_key_map().items()}
    src = tmp_path / "ref.safetensors"
    save_file(ref, str(src))
    out = tmp_path / "voc.safetensors"
    assert main(["import-checkpoint", str(src), "--out", str(out)]) == 0
    c = load_checkpoint(out)
    assert c.clip_identity == "ViT-B-16:openai" and len(c.class_names) == 20 and c.class_names[0] == "aeroplane"
    assert c.meta["vocabulary"] == "voc"
    assert main(["import-checkpoint", str(src), "--out", str(out), "--force", "--clip", str(weights)]) == 0
    assert load_checkpoint(out).clip_identity == clip.identity
    assert main(["import-checkpoint", str(src), "--out", str(out), "--force", "--vocabulary", "cat,dog"]) == 2
    assert "--vocabulary has 2 classes but the heads predict 20" in capsys.readouterr().err


# ---- Segmenter --------------------------------------------------------------------------------------------------


def test_segmenter_shapes_and_single_scale(ckpt, clip):
    from excelseg import Segmenter

    seg = Segmenter.from_checkpoint(ckpt, clip, device="cpu")
    assert seg.config == CFG
    res = seg.predict(photo(), single_scale=True)
    assert res.label.shape == (60, 80) and res.label.dtype == np.uint8
    assert set(np.unique(res.label)) <= {0, 1, 2}
    assert res.logits.shape == (3, 60, 80) and res.label_single_scale.shape == (60, 80)
    assert np.array_equal(res.label, res.logits.argmax(0).numpy())
    # single-scale label = the scale-1.0 logits alone, bilinearly upsampled (float64 oracle of the upsampling)
    from excelseg.preprocess import network_input

    lg = seg.head_logits(network_input(photo(), (64, 64))[None])
    up = torch.nn.functional.interpolate(lg.double(), size=(60, 80), mode="bilinear", align_corners=False)[0]
    assert (up.argmax(0).numpy() != res.label_single_scale).mean() <= 0.001


def test_flip_symmetry_and_the_scale_one_quirk(ckpt, clip):
    """Flipping every scale makes the aggregated logits mirror-equivariant; the VOC quirk (no flip at 1.0)
    breaks it, far beyond float32 noise."""
    from excelseg import Segmenter

    img = photo(64, 64)
    every = Segmenter.from_checkpoint(ckpt, clip, device="cpu",
                                      config=apply_overrides(CFG, ["segment.skip_flip_at_base=false"]))
    a = every.predict(img).logits
    b = every.predict(img[:, ::-1]).logits
    assert_rel_close(b.flip(-1), a, F32_REL, "mirror equivariance with flip at every scale")
    quirk = Segmenter.from_checkpoint(ckpt, clip, device="cpu")
    a, b = quirk.predict(img).logits, quirk.predict(img[:, ::-1]).logits
    assert rel_err(b.flip(-1), a) > 100 * F32_REL


def test_aggregation_is_the_mean_of_upsampled_logits():
    """aggregate_logits against a float64 numpy oracle of bilinear upsampling + flip + mean."""
    from excelseg.segmenter import aggregate_logits

    g = torch.Generator().manual_seed(0)
    per = [(torch.randn(3, 4, 4, generator=g, dtype=torch.float64), None),
           (torch.randn(3, 3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, 3, generator=g,
                                                                                dtype=torch.float64))]

    def up(x, size):  # bilinear, align_corners=False, written out
        c, h, w = x.shape
        out = np.zeros((c, *size))
        for i in range(size[0]):
            for j in range(size[1]):
                y, xx = max((i + 0.5) * h / size[0] - 0.5, 0), max((j + 0.5) * w / size[1] - 0.5, 0)
                y0, x0 = int(y), int(xx)
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                dy, dx = y - y0, xx - x0
                out[:, i, j] = ((1 - dy) * (1 - dx) * x[:, y0, x0] + (1 - dy) * dx * x[:, y0, x1]
                                + dy * (1 - dx) * x[:, y1, x0] + dy * dx * x[:, y1, x1])
        return out

    size = (7, 5)
    a = up(per[0][0].numpy(), size)
    b = (up(per[1][0].numpy(), size) + up(per[1][1].numpy(), size)[:, :, ::-1]) / 2
    got = aggregate_logits(per, size)
    assert rel_err(got, (a + b) / 2) <= 1e-10


def test_reduced_logits(ckpt, clip):
    from excelseg import Segmenter

    seg = Segmenter.from_checkpoint(ckpt, clip, device="cpu", config=apply_overrides(CFG, ["segment.logits_scale=0.2"]))
    res = seg.predict(photo(60, 80))
    assert res.logits.shape == (3, 12, 16) and res.label.shape == (60, 80)


def test_segmenter_refuses_other_clip_and_classes(ckpt, weights, tmp_path):
    from excelseg import Segmenter
    from tiny_clip import tiny_clip

    with pytest.raises(CheckpointError, match="made with CLIP sha256"):
        Segmenter.from_checkpoint(ckpt, tiny_clip(1, layers=6, patch=16, image=64, heads=1), device="cpu")
    with pytest.raises(CheckpointError, match="missing here: dog"):
        Segmenter.from_checkpoint(ckpt, weights, class_names=["cat", "bird"], device="cpu")
    with pytest.raises(ValueError, match="give that file"):
        Segmenter.from_checkpoint(ckpt, device="cpu")


# ---- excelseg segment --------------------------------------------------------------------------------------------


def odd_images(folder):
    folder.mkdir()
    Image.fromarray(photo()).save(folder / "rgb.jpg")
    Image.fromarray(photo(40, 30)[..., 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([photo(50, 50), np.full((50, 50), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(photo(30, 40)[..., 1].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(photo(1, 1)).save(folder / "pixel.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return folder


def test_cli_segment_outputs_resume_and_odd_images(ckpt, weights, tmp_path, capsys):
    photos = odd_images(tmp_path / "photos")
    out = tmp_path / "seg"
    args = ["segment", str(photos), "--checkpoint", str(ckpt), "--clip", str(weights), "--out-dir", str(out),
            "--single-scale", "--save-logits", "--device", "cpu"]
    assert main(args) == 1  # the broken file fails, the others are written
    cap = capsys.readouterr()
    assert "5 written, 0 skipped, 1 failed" in cap.out and "broken.jpg" in cap.err
    sizes = {"rgb": (60, 80), "grey": (40, 30), "rgba": (50, 50), "deep16": (30, 40), "pixel": (1, 1)}
    for stem, size in sizes.items():
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and label.size == size[::-1] and np.array(label).max() <= 2
        assert Image.open(out / f"{stem}_ss.png").size == size[::-1]
        with np.load(out / f"{stem}_logits.npz") as z:
            assert z["logits"].dtype == np.float16 and z["logits"].shape == (3, *size)
            assert list(z["class_names"]) == ["background", *CLASSES]
    assert (out / "excelseg_config.yaml").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    stamp = (out / "rgb.png").stat().st_mtime_ns
    assert main(args) == 1
    assert "5 of 6 images already done" in capsys.readouterr().out
    assert (out / "rgb.png").stat().st_mtime_ns == stamp


def segment_one_photo(ckpt, weights, tmp_path, file_name: str, out, *flags: str) -> int:
    """``excelseg segment`` on a folder holding one 80×60 photo named ``file_name``."""
    photos = tmp_path / "p"
    photos.mkdir()
    Image.fromarray(photo()).save(photos / file_name)
    return main(["segment", str(photos), "--checkpoint", str(ckpt), "--clip", str(weights), "--out-dir", str(out),
                 "--device", "cpu", *flags])


def test_cli_segment_voc_test_submission(ckpt, weights, tmp_path, capsys):
    out = tmp_path / "submit"
    assert segment_one_photo(ckpt, weights, tmp_path, "2008_000001.jpg", out, "--voc-test-submission") == 0
    label = Image.open(out / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls" / "2008_000001.png")
    assert label.mode == "P" and label.size == (80, 60)
    assert not (out / "2008_000001.png").exists()


def test_cli_segment_crf(ckpt, weights, tmp_path, capsys):
    pytest.importorskip("pydensecrf")
    out = tmp_path / "crf"
    assert segment_one_photo(ckpt, weights, tmp_path, "a.jpg", out, "--crf") == 0
    assert Image.open(out / "a_crf.png").size == (80, 60) and Image.open(out / "a.png").size == (80, 60)


@pytest.mark.parametrize("case", ["other_clip", "truncated", "pickle", "reference_file", "missing"])
def test_cli_segment_bad_checkpoints(case, ckpt, weights, tmp_path, capsys):
    from tiny_clip import save_tiny as save

    photos = tmp_path / "p"
    photos.mkdir()
    Image.fromarray(photo()).save(photos / "a.jpg")
    clip_arg, path = str(weights), ckpt
    if case == "other_clip":
        clip_arg = str(save(tmp_path / "other.pt", seed=1, layers=6, patch=16, image=64, heads=1))
        expected = "was made with CLIP sha256"
    elif case == "truncated":
        path = tmp_path / "t.safetensors"
        path.write_bytes(ckpt.read_bytes()[:1000])
        expected = "not a readable safetensors file"
    elif case == "pickle":
        path = tmp_path / "model_iter_30000.pth"
        torch.save({"x": argparse.Namespace(lr=1)}, path)
        expected = "import-checkpoint"
    elif case == "reference_file":
        from safetensors.torch import save_file

        path = tmp_path / "ref.safetensors"
        save_file({"decoder.linear_pred.weight": torch.zeros(21, 256, 1, 1)}, str(path))
        expected = "not an excelseg heads checkpoint"
    else:
        path = tmp_path / "nope.safetensors"
        expected = "checkpoint not found"
    rc = main(["segment", str(photos), "--checkpoint", str(path), "--clip", clip_arg, "--out-dir",
               str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- cam / CamPredictor with a checkpoint (LVC) ---------------------------------------------------------------


def test_cam_predictor_with_checkpoint_uses_lvc(ckpt, clip):
    from excelseg import CamPredictor

    plain = CamPredictor(clip, vocabulary=CLASSES, config=CFG, device="cpu")
    lvc = CamPredictor(clip, config=CFG, device="cpu", checkpoint=ckpt)  # vocabulary from the checkpoint
    assert list(lvc.vocabulary.names) == CLASSES
    img = photo()
    r0, r1 = plain.set_image(img).predict(CLASSES), lvc.set_image(img).predict(CLASSES)
    assert r1.pseudo_label.shape == (60, 80) and r1.raw_cams.shape == r0.raw_cams.shape
    assert np.abs(r1.raw_cams - r0.raw_cams).max() > 1e-3  # the LVC shift changes the CAMs
    assert r1.raw_cams.min() >= 0 and r1.raw_cams.max() < 1  # max-combined, min–max with +1e-5
    # the LVC CAMs of an image and of its mirror image are mirrors (flip-max combination is symmetric)
    r2 = lvc.set_image(img[:, ::-1]).predict(CLASSES)
    assert_rel_close(r2.raw_cams[..., ::-1], r1.raw_cams, 1e-3, "LVC flip symmetry")
    with pytest.raises(CheckpointError, match="missing here: dog"):
        CamPredictor(clip, vocabulary=["cat", "bird"], config=CFG, device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="scale 1 with flip"):
        CamPredictor(clip, config=apply_overrides(CFG, ["cam.scales=[1, 0.5]"]), device="cpu", checkpoint=ckpt)


def test_cli_cam_checkpoint(ckpt, weights, tmp_path, capsys):
    photos = odd_images(tmp_path / "photos")
    out = tmp_path / "cam"
    rc = main(["cam", str(photos), "--checkpoint", str(ckpt), "--clip", str(weights), "--classes", "dog",
               "--out-dir", str(out), "--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 1 and "5 written" in cap.out and "broken.jpg" in cap.err
    assert set(np.unique(np.array(Image.open(out / "rgb.png")))) <= {0, 2}  # dog = label 2 of the checkpoint
    rc = main(["cam", str(photos), "--checkpoint", str(ckpt), "--clip", str(weights), "--vocabulary", "cat,bird",
               "--out-dir", str(tmp_path / "o2"), "--device", "cpu"])
    assert rc == 2 and "missing here: dog" in capsys.readouterr().err


def test_upsampled_argmax_in_blocks_equals_the_full_upsampling():
    """The blockwise separable upsampling (bounded memory for huge images) against F.interpolate in float64:
    identical labels except at near-ties (≤ 0.1 % of pixels; random logits have essentially none)."""
    from excelseg.segmenter import upsampled_argmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 9, generator=g, dtype=torch.float64)
    full = torch.nn.functional.interpolate(logits[None], size=(61, 83), mode="bilinear",
                                           align_corners=False)[0].argmax(0)
    for chunk in (5 * 61 * 83, 5 * 83 * 3, 1):  # one block, 3 rows per block, 1 row per block
        got = upsampled_argmax(logits, (61, 83), chunk_elements=chunk)
        assert (got != full).double().mean() <= 1e-3
    assert torch.equal(upsampled_argmax(logits, (7, 9)), logits.argmax(0))


def test_cli_segment_a_prepared_dataset_then_eval(ckpt, weights, tmp_path, capsys):
    """segment --index (outputs named by id) → eval finds them and prints the single-scale and MS+flip rows;
    a dataset with another class list is refused before any image is read."""
    from excelseg.io.files import save_label_png

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for name, seed in (("x", 0), ("y", 1)):
        Image.fromarray(photo(seed=seed)).save(images / f"{name}.png")
        save_label_png(masks / f"{name}.png", np.ones((60, 80), np.uint8))
    (tmp_path / "labels.csv").write_text("x.png,cat\ny.png,cat;dog\n")
    index = tmp_path / "index.json"
    assert main(["prepare", "--dataset", "folder", "--root", str(images), "--labels", str(tmp_path / "labels.csv"),
                 "--masks", str(masks), "--out", str(index), "--workers", "1"]) == 0
    out = tmp_path / "seg"
    assert main(["segment", "--dataset", "folder", "--index", str(index), "--checkpoint", str(ckpt), "--clip",
                 str(weights), "--out-dir", str(out), "--single-scale", "--device", "cpu"]) == 0
    assert (out / "x.png").is_file() and (out / "y_ss.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--pred", str(out), "--dataset", "folder", "--index", str(index), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "single-scale" in printed and "MS+flip" in printed
    other = tmp_path / "other.csv"
    other.write_text("x.png,bird\ny.png,cat\n")
    index2 = tmp_path / "index2.json"
    assert main(["prepare", "--dataset", "folder", "--root", str(images), "--labels", str(other),
                 "--out", str(index2), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["segment", "--dataset", "folder", "--index", str(index2), "--checkpoint", str(ckpt), "--clip",
                 str(weights), "--out-dir", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "trained for 2 classes" in capsys.readouterr().err
