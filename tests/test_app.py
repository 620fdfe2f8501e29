"""``excelseg app`` without a browser: the page's model side (:class:`excelseg.app.AppModel`) on the shipped synthetic
CLIP — correct results, the image pass cached across class names (counted on the real CLIP patch embedding), every
kind of bad input answered with a message while the next request still works, bounded memory for a huge photo,
concurrent callers kept apart, the trained-segmenter switch, and the command's usage errors."""

from __future__ import annotations

import html
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.app import EXAMPLE_SEED, EXAMPLE_SIDE, MAX_HEATMAPS, AppModel, Switches, split_class_text
from excelseg.cli import main
from excelseg.io.cams import read_cam_archive
from excelseg.io.files import read_label_png
from excelseg.synthetic import SceneGenerator
from excelseg.weights import load_clip

# under pytest-xdist (`make test`), the module's AppModel (and its cache) is built once, on one worker
pytestmark = pytest.mark.xdist_group("app")

SCENE = 30  # example-seed scene whose three classes the shipped synthetic CLIP finds (5.5, 6.5, 3.5 % of the pixels)


@pytest.fixture(scope="module")
def clip():
    return load_clip("synthetic", device="cpu")


@pytest.fixture(scope="module")
def model(clip, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the synthetic TSE bank is built into a private cache
        mp.setenv("EXCELSEG_CACHE", str(tmp_path_factory.mktemp("cache")))
        m = AppModel(clip, device="cpu", work_dir=tmp_path_factory.mktemp("work"))
        m.predictor(Switches())
        yield m
        m.close()


def scene_file(folder: Path, index: int = SCENE, size: int = EXAMPLE_SIDE, name: str | None = None):
    scene = SceneGenerator(size=size, seed=EXAMPLE_SEED).scene(index)
    path = folder / (name or f"scene_{index}.png")
    Image.fromarray(scene.image).save(path)
    return path, list(scene.names)


class ForwardCounter:
    """Counts real forward passes of the CLIP image tower (a hook on its patch embedding)."""

    def __init__(self, clip):
        self.calls = 0
        self._handle = clip.model.visual.conv1.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1

    def close(self):
        self._handle.remove()


def test_result_matches_the_scene_and_the_downloads(model, tmp_path):
    path, names = scene_file(tmp_path)
    r = model.run(path, ", ".join(names))
    assert r.ok, r.status
    assert [e.name for e in r.legend] == names  # exactly the scene's classes, in the order typed
    label = read_label_png(r.label_png)
    assert label.shape == (EXAMPLE_SIDE, EXAMPLE_SIDE) == r.image_size
    assert Image.open(r.label_png).mode == "P"
    assert set(np.unique(label).tolist()) == {0, *[e.label for e in r.legend]}
    for e in r.legend:
        assert e.share == pytest.approx((label == e.label).mean())
    cams, ids = read_cam_archive(r.cams_npz)
    assert cams.shape == (len(names), EXAMPLE_SIDE, EXAMPLE_SIDE) and ids.tolist() == list(range(1, len(names) + 1))
    with np.load(r.cams_npz) as z:
        assert z["class_names"].tolist() == names
    assert r.overlay.dtype == np.uint8 and r.overlay.shape[1] == 768  # shown enlarged to the overlay side
    assert [c for _, c in r.heatmaps] == sorted(names, key=lambda n: -next(e.share for e in r.legend if e.name == n))
    assert f'data-count="{len(names)}"' in r.legend_html and all(f'data-class="{n}"' in r.legend_html for n in names)


def test_changing_only_the_class_names_does_not_rerun_the_image_tower(model, tmp_path):
    # scenes 11 and 12 appear in no other test: the module's model caches image passes, whatever ran before
    path, names = scene_file(tmp_path, index=11)
    counter = ForwardCounter(model.clip)
    try:
        first = model.run(path, ", ".join(names))
        assert first.ok and counter.calls == 1 and not first.image_cached
        assert "image tower: " in first.timing and "cached" not in first.timing
        for classes, sw in [(names[0], Switches()),  # other class names
                            (", ".join(names), Switches(tse=False)),  # TSE and PAR change the class pass only
                            (", ".join(names), Switches(par=False)),
                            ("orange square", Switches())]:
            r = model.run(path, classes, switches=sw)
            assert r.ok and r.image_cached and "image tower: cached" in r.timing, r.status
        assert counter.calls == 1
        r = model.run(path, names[0], switches=Switches(svc=False))  # SVC changes the image pass
        assert r.ok and not r.image_cached and counter.calls == 2
        other, other_names = scene_file(tmp_path, index=12)
        assert model.run(other, ", ".join(other_names)).ok and counter.calls == 3
    finally:
        counter.close()


def _truncated_png(folder: Path) -> Path:
    path, _ = scene_file(folder, index=1, name="full.png")
    data = path.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return folder / "truncated.png"


@pytest.mark.parametrize("case, expected", [
    ("text file", "cannot read image notes.png: not an image"),
    ("truncated", "cannot read image truncated.png: truncated"),
    ("empty file", "cannot read image empty.png: empty file"),
    ("no image", "upload an image"),
    ("no classes", "type the class names"),
    ("empty name", "empty class name"),
    ("duplicate", "duplicate class name 'Blue Disc'"),
    ("201 classes", "201 class names given; at most 200"),
    ("unknown voc class", "class 'blue disc' is not in the voc vocabulary"),
    ("broken knowledge base", "not UTF-8"),
    ("segmenter without checkpoint", "needs a checkpoint"),
])
def test_bad_input_gives_a_message_and_the_next_request_works(model, tmp_path, case, expected):
    good, names = scene_file(tmp_path)
    image, classes, vocab, sw = good, ", ".join(names), "typed names", Switches()
    if case == "text file":
        image = tmp_path / "notes.png"
        image.write_text("these are notes, not pixels")
    elif case == "truncated":
        image = _truncated_png(tmp_path)
    elif case == "empty file":
        image = tmp_path / "empty.png"
        image.write_bytes(b"")
    elif case == "no image":
        image = None
    elif case == "no classes":
        classes = " \n "
    elif case == "empty name":
        classes = "blue disc,, red ring"
    elif case == "duplicate":
        classes = "blue disc, Blue Disc"
    elif case == "201 classes":
        classes = ",".join(f"shape {i}" for i in range(201))
    elif case == "unknown voc class":
        classes, vocab = "cat, blue disc", "voc"
    elif case == "broken knowledge base":
        kb = tmp_path / "kb.json"
        kb.write_bytes(b"\xff\xfe not utf-8")
        sw = Switches(knowledge=str(kb))
    elif case == "segmenter without checkpoint":
        sw = Switches(segmenter=True)
    bad = model.run(image, classes, vocab, sw)
    assert not bad.ok and bad.status.startswith("**Error:**") and expected in bad.status, bad.status
    assert bad.label_png is None and bad.legend == [] and 'data-count="0"' in bad.legend_html
    again = model.run(good, ", ".join(names))
    assert again.ok and [e.name for e in again.legend] == names


def test_two_hundred_classes_and_named_vocabularies(model, tmp_path):
    path, names = scene_file(tmp_path, size=96)
    many = names + [f"thing {i}" for i in range(200 - len(names))]
    # PAR off: its cost grows with classes × pixels (201 maps here) and it is not what this test is about
    r = model.run(path, ", ".join(many), switches=Switches(tse=False, par=False))
    assert r.ok, r.status
    assert len(r.heatmaps) == MAX_HEATMAPS and "the .npz holds all 200" in r.status
    cams, ids = read_cam_archive(r.cams_npz)
    assert cams.shape == (200, 96, 96) and ids.tolist() == list(range(1, 201))
    assert {e.name for e in r.legend} <= set(many)
    # PAR's (classes + 1) maps stay within a budget: smaller working sides for many classes (images up to that
    # side are unaffected)
    assert [model.par_side(k) for k in (1, 15, 16, 63, 64, 200)] == [1024, 1024, 512, 512, 256, 256]
    # and the page works on the image at twice the PAR side at most
    assert [model.work_side(k) for k in (1, 15, 16, 64, 200)] == [2048, 2048, 1024, 512, 512]
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.kron(np.asarray(Image.open(path)), np.ones((10, 13, 1), np.uint8))).save(photo)
    r = model.run(photo, ", ".join(many[:20]), switches=Switches(tse=False, par=False))
    assert r.ok and r.image_size == (788, 1024) and "with this many classes" in r.status, r.status
    # a named vocabulary: typed names are looked up in it (label = its index + 1); none typed = all its classes
    r = model.run(path, "cat, dog", "voc")
    assert r.ok and read_label_png(r.label_png).max() <= 12 and {e.label for e in r.legend} <= {8, 12}
    r = model.run(path, "", "synthetic")
    assert r.ok and len(r.heatmaps) == 16


def test_class_names_are_escaped_in_the_legend(model, tmp_path):
    path, _ = scene_file(tmp_path)
    evil = '<img src=x onerror="alert(1)">'
    r = model.run(path, evil)
    assert r.ok
    assert "<img" not in r.legend_html and (not r.legend or html.escape(evil, quote=True) in r.legend_html)


def test_split_class_text_reads_commas_and_lines_never_files():
    assert split_class_text("red disc, blue cross\ngreen ring,\n") == ["red disc", "blue cross", "green ring"]
    assert split_class_text("a,,b") == ["a", "", "b"]
    assert split_class_text("/etc/passwd") == ["/etc/passwd"]  # a class name, not a file to read
    assert split_class_text(None) == []


def test_a_huge_photo_is_reduced_while_it_is_read(model, tmp_path):
    big = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (40, 90, 200)).save(big, quality=70)
    r = model.run(big, "blue disc")
    assert r.ok, r.status
    assert r.image_size == (1536, 2048) and read_label_png(r.label_png).shape == (1536, 2048)
    assert "reduced from 12000×9000 to 2048×1536" in r.status
    # memory: the reader the page uses decodes the JPEG at 1/4 scale (full size would be 324 MB of RGB)
    code = ("import resource; from excelseg.app import MAX_PIXELS, MAX_SIDE; from excelseg.io.images import read_image; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"img = read_image({str(big)!r}, max_pixels=MAX_PIXELS, max_side=MAX_SIDE); "
            "print(img.size, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    size, grown_mb = out.stdout.strip().rsplit(" ", 1)
    assert size == "(2048, 1536)" and int(grown_mb) < 150, out.stdout


def test_concurrent_callers_get_their_own_results(model, tmp_path):
    scenes = [scene_file(tmp_path, index=i) for i in (0, 2, 8, 7)]  # scenes whose classes are all found
    results: dict[int, object] = {}

    def ask(k: int) -> None:
        path, names = scenes[k % len(scenes)]
        results[k] = (names, model.run(path, ", ".join(names)))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8
    for names, r in results.values():
        assert r.ok and [e.name for e in r.legend] == names, r.status
        assert Path(r.label_png).name.startswith("scene_")


def test_trained_segmenter_switch(clip, tmp_path, capsys):
    from excelseg.config import apply_overrides, load_config
    from excelseg.heads import ExcelHeads
    from excelseg.io.checkpoint import save_checkpoint

    classes = ["red disc", "blue cross", "green ring"]
    torch.manual_seed(0)
    heads = ExcelHeads(len(classes) + 1, 6, 128, dim=32, heads=2)
    with torch.no_grad():
        heads.decoder.classifier.weight.mul_(20)
    cfg = apply_overrides(load_config("synthetic"), ["heads.dim=32", "heads.decoder_heads=2"])
    ckpt = save_checkpoint(tmp_path / "heads.safetensors", heads.state_dict(), class_names=classes,
                           clip_identity=clip.identity, config=cfg)
    if __import__("importlib").util.find_spec("gradio") is not None:  # the command names the weights to give
        other = save_checkpoint(tmp_path / "other.safetensors", heads.state_dict(), class_names=classes,
                                clip_identity="sha256:" + "0" * 64, config=cfg)
        assert main(["app", "--checkpoint", str(other)]) == 2
        assert "made with the CLIP weight file sha256:" in capsys.readouterr().err
    m = AppModel(clip, checkpoint=ckpt, device="cpu", work_dir=tmp_path / "work")
    path, _ = scene_file(tmp_path)
    counter = ForwardCounter(clip)
    try:
        r = m.run(path, "", switches=Switches(segmenter=True))
        assert r.ok, r.status
        calls = counter.calls
        assert calls >= 1 and "trained segmenter (3 classes" in r.status
        assert read_label_png(r.label_png).shape == (EXAMPLE_SIDE, EXAMPLE_SIDE)
        assert {e.name for e in r.legend} <= set(classes) and len(r.heatmaps) == len(r.legend)
        again = m.run(path, "", switches=Switches(segmenter=True))
        assert again.image_cached and counter.calls == calls
        assert m.run(path, "red disc", switches=Switches(tse=False)).ok  # training-free beside it
    finally:
        counter.close()


def test_text_features_cache_is_bounded(clip):
    """A long-running page asked about ever new class lists keeps at most TEXT_CACHE_SIZE vocabularies."""
    from excelseg.predictor import TEXT_CACHE_SIZE, CamPredictor
    from excelseg.vocab import Vocabulary

    p = CamPredictor(clip, device="cpu")
    vocabs = [Vocabulary.from_names([f"shape {i}"]) for i in range(TEXT_CACHE_SIZE + 1)]
    first = p.text_features(vocabs[0])
    assert p.text_features(vocabs[0]) is first  # cached
    kept = [p.text_features(v) for v in vocabs[1:]]
    assert p.text_features(vocabs[-1]) is kept[-1]  # the newest stay
    again = p.text_features(vocabs[0])  # the oldest was dropped: computed anew (same values)
    assert again is not first and torch.equal(again, first)


def test_read_image_max_side(tmp_path):
    from excelseg.io.images import read_image

    for name in ("wide.jpg", "wide.png"):
        Image.new("RGB", (3000, 1200), (10, 200, 30)).save(tmp_path / name)
        img = read_image(tmp_path / name, max_side=500)
        assert img.size == (500, 200) and img.mode == "RGB"
        assert read_image(tmp_path / name, max_side=5000).size == (3000, 1200)


def test_app_command_usage_errors(capsys):
    assert main(["app", "--port", "70000"]) == 2
    assert "--port must lie in 1-65535" in capsys.readouterr().err
    if __import__("importlib").util.find_spec("gradio") is None:
        assert main(["app", "--clip", "synthetic"]) == 2
        assert "pip install 'excelseg[app]'" in capsys.readouterr().err
    else:
        assert main(["app", "--clip", "synthetic", "--max-side", "10"]) == 2
        assert "--max-side: must lie in [64, 16384]" in capsys.readouterr().err
        assert main(["app", "--clip", "synthetic", "cam.bogus=1"]) == 2
        assert "unknown setting cam.bogus" in capsys.readouterr().err


def test_upload_component_hands_over_the_file_untouched(tmp_path):
    """The page's image input gives the handler the uploaded path without decoding it, so excelseg's reader (not
    Gradio's) reports a broken file; the browser side is the stock image component."""
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    from excelseg.app import image_input

    notes = tmp_path / "notes.png"
    notes.write_text("not pixels")
    comp = image_input(gr, image_mode=None)
    assert comp.get_block_name() == "image"
    assert comp.preprocess(ImageData(path=str(notes), orig_name="notes.png")) == str(notes)
    assert comp.preprocess(None) is None
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):  # what the stock component does with it
        gr.Image(type="filepath", image_mode=None).preprocess(ImageData(path=str(notes), orig_name="notes.png"))
    import excelseg.app

    assert not list(Path(excelseg.app.__file__).parent.glob("*.pyi"))  # no stub written into the package


def test_examples_and_notice_follow_the_weights(model, tmp_path):
    """Synthetic CLIP: generated scenes and a plain notice of what the weights know; real weights (here a tiny
    random CLIP): scikit-image's sample photos as examples and no notice."""
    from excelseg.app import header_markdown
    from tiny_clip import tiny_clip

    scenes = model.examples()
    assert len(scenes) == 4 and all(p.is_file() and Image.open(p).size == (EXAMPLE_SIDE,) * 2 for p, _ in scenes)
    notice = header_markdown(model)
    assert "only know the 16 synthetic classes" in notice and "excelseg app --clip ViT-B-16" in notice
    real = AppModel(tiny_clip(), device="cpu", work_dir=tmp_path)
    assert "only know" not in header_markdown(real)
    if __import__("importlib").util.find_spec("skimage") is None:
        assert real.examples() == []
    else:
        photos = {p.name: c for p, c in real.examples()}
        assert photos.get("chelsea.png") == "cat" and all(p.is_file() for p, _ in real.examples())
