"""Image reading / conversion, image collection, palette PNGs, atomic writers and overlays."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from excelseg.io.files import atomic_write, read_label_png, save_jpeg, save_json, save_label_png, save_npz
from excelseg.io.images import MAX_PIXELS, ImageReadError, collect_images, read_image, to_rgb_array
from excelseg.io.palette import VOC_PALETTE
from excelseg.viz import heatmap, jet_colormap, overlay, overlay_sheet

# ------------------------------------------------------------------------------------------------------------
# reading every mode


def _read(tmp_path: Path, img: Image.Image, name: str, **save_kw) -> np.ndarray:
    path = tmp_path / name
    img.save(path, **save_kw)
    out = read_image(path)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == img.size
    arr = to_rgb_array(out)
    assert arr.dtype == np.uint8 and arr.shape == (img.height, img.width, 3)
    return arr


def _grey(arr: np.ndarray) -> np.ndarray:
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def test_read_l_rgb_and_bilevel(tmp_path):
    assert (_read(tmp_path, Image.new("L", (3, 2), 100), "l.png") == 100).all()
    arr = _read(tmp_path, Image.new("RGB", (3, 2), (10, 20, 30)), "rgb.png")
    assert (arr == [10, 20, 30]).all()
    assert (_read(tmp_path, Image.new("1", (3, 2), 1), "one.png") == 255).all()


def test_read_alpha_modes_composite_over_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))  # opaque
    la.putpixel((1, 0), (100, 0))  # fully transparent → white
    arr = _read(tmp_path, la, "la.png")
    assert arr[0, 0].tolist() == [100] * 3 and arr[0, 1].tolist() == [255] * 3

    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (200, 0, 0, 0))
    rgba.putpixel((2, 0), (200, 0, 0, 128))  # 200·128/255 + 255·127/255 ≈ 227.4; 0 + 127
    arr = _read(tmp_path, rgba, "rgba.png").astype(int)
    assert arr[0, 0].tolist() == [200, 0, 0]
    assert arr[0, 1].tolist() == [255, 255, 255]
    assert np.abs(arr[0, 2] - [227, 127, 127]).max() <= 1


def test_read_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    arr = _read(tmp_path, p, "p.png")
    assert arr[0, 0].tolist() == [10, 20, 30] and arr[0, 1].tolist() == [200, 100, 50]

    p.info["transparency"] = 1  # index 1 transparent → white
    arr = _read(tmp_path, p, "pt.png", transparency=1)
    assert arr[0, 0].tolist() == [10, 20, 30] and arr[0, 1].tolist() == [255, 255, 255]
    # GIF keeps its transparency index too
    arr = _read(tmp_path, p, "pt.gif", transparency=1)
    assert arr[0, 1].tolist() == [255, 255, 255]


def test_read_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    assert (_read(tmp_path, cmyk, "c.tif") == [255, 0, 0]).all()


def test_read_16_bit_scaled_by_bit_depth(tmp_path):
    k = np.arange(256, dtype=np.uint16)
    ramp = np.stack([k * 257, k * 257])  # 0, 257, …, 65535 → exactly 0, 1, …, 255
    img16 = Image.fromarray(ramp)
    assert img16.mode == "I;16"
    for name in ("ramp.png", "ramp.tif"):
        grey = _grey(_read(tmp_path, img16, name))
        np.testing.assert_array_equal(grey, np.stack([k, k]).astype(np.uint8))
    # odd values round: v·255/65535
    odd = np.array([[0, 128, 32767, 32768, 65534, 65535]], np.uint16)
    grey = _grey(_read(tmp_path, Image.fromarray(odd), "odd.png"))
    np.testing.assert_array_equal(grey, np.rint(odd.astype(np.float64) * 255 / 65535).astype(np.uint8))
    # a 12-bit PGM (maxval 4095): Pillow stretches it to 16 bits, mode "I"
    pgm = tmp_path / "twelve.pgm"
    pgm.write_bytes(b"P5\n3 1\n4095\n" + np.array([0, 2048, 4095], ">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    assert _grey(to_rgb_array(read_image(pgm))).tolist() == [[0, 128, 255]]


def test_read_32_bit_int_and_float(tmp_path):
    i16_in_i = np.array([[0, 257 * 10, 65535]], np.int32)  # 16-bit data held in mode "I"
    img = Image.fromarray(i16_in_i)
    assert img.mode == "I"
    assert _grey(_read(tmp_path, img, "i.tif")).tolist() == [[0, 10, 255]]
    big = Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], np.int32))  # needs 31 bits: scaled by 2³¹ − 1
    assert _grey(to_rgb_array(big)).tolist() == [[0, 128, 255]]

    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert f.mode == "F"
    assert _grey(_read(tmp_path, f, "f.tif")).tolist() == [[0, 128, 255]]
    f255 = Image.fromarray(np.array([[0.0, 100.0, 255.0]], np.float32))  # Pillow's convert("F") range
    assert _grey(to_rgb_array(f255)).tolist() == [[0, 100, 255]]
    with pytest.raises(ValueError, match="values in"):
        to_rgb_array(Image.fromarray(np.array([[-5.0, 300.0]], np.float32)))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = read_image(path)
    assert out.size == (20, 40)
    arr = to_rgb_array(out)
    assert arr[:10, :, 0].mean() > 200 and arr[-10:, :, 0].mean() < 50  # left band is now the top
    with Image.open(path) as raw:
        assert to_rgb_array(raw).shape == (40, 20, 3)  # PIL input to to_rgb_array is oriented too
    assert to_rgb_array(out).shape == (40, 20, 3)  # and never twice


# ------------------------------------------------------------------------------------------------------------
# read errors


def _error(path: Path) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_read_errors(tmp_path):
    assert "no such file" in _error(tmp_path / "missing.jpg")
    assert "directory" in _error(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty" in _error(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("definitely not a JPEG\n")
    assert "not an image" in _error(text)

    rng = np.random.default_rng(0)
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(cut)
    assert isinstance(ImageReadError("x"), ValueError)


def test_pixel_limit_raised_locally_and_enforced(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (60, 60), 7).save(path)  # 3,600 px
    # pretend Pillow's global bomb guard were tiny: 3,600 px > 2 × 1,000 would be a DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert read_image(path).size == (60, 60)  # excelseg raises the guard to its own 200 MP limit while reading
    assert Image.MAX_IMAGE_PIXELS == 1000  # ... and restores it
    msg = str(pytest.raises(ImageReadError, read_image, path, max_pixels=3000).value)
    assert str(path) in msg and "3,000-pixel limit" in msg and "\n" not in msg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)  # Pillow would accept it; excelseg's limit refuses
    msg = str(pytest.raises(ImageReadError, read_image, path, max_pixels=3000).value)
    assert "60x60 = 3,600 pixels" in msg and "limit of 3,000" in msg
    assert Image.MAX_IMAGE_PIXELS == 10**6
    assert MAX_PIXELS >= 12000 * 9000


# ------------------------------------------------------------------------------------------------------------
# numpy inputs


def test_numpy_layouts_and_dtypes():
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    np.testing.assert_array_equal(to_rgb_array(grey), np.repeat(grey[:, :, None], 3, 2))
    np.testing.assert_array_equal(to_rgb_array(grey[:, :, None]), np.repeat(grey[:, :, None], 3, 2))
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(to_rgb_array(rgb), rgb)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 255]
    rgba[0, 1] = [10, 20, 30, 0]
    assert to_rgb_array(rgba).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    assert to_rgb_array(np.array([[0, 257, 65535]], np.uint16))[..., 0].tolist() == [[0, 1, 255]]
    assert to_rgb_array(np.array([[True, False]]))[..., 1].tolist() == [[255, 0]]
    assert to_rgb_array(np.array([[0.0, 0.5, 1.0]], np.float32))[..., 2].tolist() == [[0, 128, 255]]
    assert to_rgb_array(np.array([[0.25]], np.float64)).shape == (1, 1, 3)  # 1×1 is fine
    assert to_rgb_array(Image.new("RGB", (1, 1))).shape == (1, 1, 3)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((3, 8, 8), np.uint8), "channel-first"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"expected \(H, W\)"),
        (np.zeros((8, 8, 2), np.uint8), r"expected \(H, W\)"),
        (np.zeros(8, np.uint8), r"expected \(H, W\)"),
        (np.zeros((0, 5), np.uint8), "at least 1x1"),
        (np.zeros((4, 0, 3), np.uint8), "at least 1x1"),
        (np.array([[0.5, 1.5]]), r"\[0, 1\]"),
        (np.array([[-0.1, 0.5]], np.float32), r"\[0, 1\]"),
        (np.array([[np.nan, 0.5]]), "NaN"),
        (np.zeros((2, 2), np.int32), "dtype"),
    ],
)
def test_numpy_rejected(array, match):
    with pytest.raises(ValueError, match=match):
        to_rgb_array(array)


# ------------------------------------------------------------------------------------------------------------
# collecting inputs


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")
    return path


def test_collect_images(tmp_path, monkeypatch):
    d = tmp_path / "photos"
    a = _touch_image(d / "a.jpg")
    b = _touch_image(d / "b.PNG")
    _touch_image(d / ".hidden.jpg")
    (d / "notes.txt").write_text("x")
    sub = _touch_image(d / "sub" / "c.webp")
    (tmp_path / "empty").mkdir()

    assert collect_images([str(d)]) == [a, b]
    assert collect_images([d], recursive=True) == [a, b, sub]
    assert collect_images([str(d / "*.jpg")]) == [a]
    assert collect_images([str(d / "**" / "*.webp")]) == [sub]
    assert collect_images([str(d / "*")]) == [a, b]  # image suffixes only, directories and .txt skipped
    # explicit files in the given order, then a directory; duplicates keep their first place
    assert collect_images([str(b), str(a), str(d), str(d / "*.jpg")]) == [b, a]
    assert collect_images(str(a)) == [a]
    monkeypatch.chdir(tmp_path)
    assert collect_images(["photos/*.jpg"]) == [Path("photos/a.jpg")]

    with pytest.raises(FileNotFoundError, match="no such file or directory: .*missing"):
        collect_images([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="matched nothing"):
        collect_images([str(d / "*.gif")])
    with pytest.raises(FileNotFoundError, match=r"no images in .*empty \(looked for .*\.jpg.*\.png"):
        collect_images([str(tmp_path / "empty")])


# ------------------------------------------------------------------------------------------------------------
# palette PNGs and atomic writers


def test_voc_palette():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[2].tolist() == [0, 128, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[20].tolist() == [0, 64, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in VOC_PALETTE.tolist()}) == 256


def test_label_png_round_trip(tmp_path):
    label = np.zeros((6, 8), np.uint8)
    label.flat[:22] = [*range(21), 255]
    path = save_label_png(tmp_path / "out" / "mask.png", label)
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), label)
        pal = np.array(im.getpalette(), np.uint8).reshape(-1, 3)
    assert pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]
    got = read_label_png(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, label)
    # greyscale index PNGs read as is; colour masks are refused
    Image.fromarray(label).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "grey.png"), label)
    Image.new("RGB", (4, 4), (128, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="palette"):
        read_label_png(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_label_png(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        save_label_png(tmp_path / "bad.png", np.array([[0, 300]]))


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "result.png"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, broken)
    assert _listing(tmp_path) == []  # neither the target nor the temporary file

    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["result.png"]

    seen = []

    def good(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"new")

    assert atomic_write(target, good) == target
    assert target.read_bytes() == b"new" and _listing(tmp_path) == ["result.png"]
    assert not seen[0].exists()


def test_atomic_helpers(tmp_path):
    npz = save_npz(tmp_path / "cams.bin", cam=np.arange(6, dtype=np.float16).reshape(2, 3))
    assert npz.name == "cams.bin"  # no ".npz" appended
    with np.load(npz) as z:
        assert z["cam"].dtype == np.float16 and z["cam"].tolist() == [[0, 1, 2], [3, 4, 5]]
    js = save_json(tmp_path / "m.json", {"miou": float("nan"), "iou": np.array([0.5, np.nan]), "n": np.int64(3)})
    assert json.loads(js.read_text()) == {"miou": None, "iou": [0.5, None], "n": 3}
    jpg = save_jpeg(tmp_path / "x.jpg", np.full((8, 8, 3), 200, np.uint8), quality=95)
    assert np.abs(to_rgb_array(read_image(jpg)).astype(int) - 200).max() <= 2
    assert _listing(tmp_path) == ["cams.bin", "m.json", "x.jpg"]


# ------------------------------------------------------------------------------------------------------------
# overlays


def _scene(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((h, w, 3), 100, np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[5:20, 5:25] = 1
    label[25:35, 30:50] = 15
    label[0, :] = 255
    return image, label


def test_overlay_colours_and_legend():
    image, label = _scene()
    out = overlay(image, label, {0: "background", 1: "aeroplane", 15: "person"}, alpha=0.5)
    h, w = label.shape
    assert out.dtype == np.uint8 and out.shape[1] == w and out.shape[0] > h
    body = out[:h]
    assert (body[label == 0] == 100).all() and (body[label == 255] == 100).all()
    # aeroplane: 0.5·100 + 0.5·(128, 0, 0) = (114, 50, 50)
    assert np.abs(body[label == 1].astype(int) - [114, 50, 50]).max() <= 1
    assert np.abs(body[label == 15].astype(int) - [146, 114, 114]).max() <= 1
    legend = out[h:].reshape(-1, 3)
    assert (legend == [128, 0, 0]).all(axis=1).any() and (legend == [192, 128, 128]).all(axis=1).any()
    assert (legend.astype(int).sum(axis=1) < 150).any()  # dark text was drawn
    no_legend = overlay(image, label, None, legend=False)
    assert no_legend.shape == image.shape
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, label[:10])


def test_jet_and_heatmap():
    assert jet_colormap(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0]]
    image, _ = _scene()
    cam = np.zeros((40, 60), np.float32)
    cam[:, 30:] = 1.0
    out = heatmap(image, cam, "cat")
    assert out.shape[1] == 60 and out.shape[0] > 40
    body = out[-40:].astype(int)
    assert (body[:, 40:, 0] > body[:, 40:, 2]).all()  # hot → red
    assert (body[:, :20, 2] > body[:, :20, 0]).all()  # cold → blue
    assert (out[:-40].astype(int).sum(axis=-1) < 150).any()  # dark title text
    low_res = heatmap(image, np.linspace(0, 1, 20 * 20, dtype=np.float32).reshape(20, 20), "")
    assert low_res.shape == out.shape
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        heatmap(image, cam * 3, "x")


def test_overlay_sheet_small():
    image, label = _scene()
    cams = np.stack([np.zeros((40, 60)), np.ones((40, 60)), np.full((40, 60), 0.5)]).astype(np.float32)
    sheet = overlay_sheet(image, label, {1: "aeroplane"}, cams, ["a", "b", "c"], gap=4)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    assert sheet.shape[1] == 2 * 60 + 4  # 4 panels → 2 × 2 grid
    with pytest.raises(ValueError, match="titles"):
        overlay_sheet(image, label, None, cams, ["a"])


def test_overlay_sheet_huge_input_is_bounded():
    h, w, max_side = 9000, 12000, 768
    # zero-stride views: 324 MB of "image" that is never materialised
    image = np.broadcast_to(np.array([90, 120, 150], np.uint8), (h, w, 3))
    label = np.broadcast_to(np.uint8(1), (h, w))
    cams = np.broadcast_to(np.float32(0.75), (2, h, w))
    tracemalloc.start()
    try:
        sheet = overlay_sheet(image, label, {1: "aeroplane"}, cams, ["aeroplane", "bus"], max_side=max_side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 3 panels → 2 columns × 2 rows, each image part 768 × 576
    assert sheet.shape[1] == 2 * max_side + 4
    assert sheet.shape[0] < 2 * (576 + 150) + 4
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    tinted = np.array([90, 120, 150]) // 2 + np.array([128, 0, 0]) // 2
    assert np.abs(sheet[100, 100].astype(int) - tinted).max() <= 1
