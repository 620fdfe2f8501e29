"""README promises of ``excelseg app`` (issue 24, item 6): how the page is served and its limits.

Gradio's own ``Blocks.launch`` / ``Blocks.queue`` are intercepted (nothing is served), then ``excelseg app`` runs
as a user starts it: the page binds to 127.0.0.1 unless ``--host`` says otherwise, never makes a share link, has
Gradio's analytics off, refuses uploads over 100 MB before they reach the model and queues at most 64 requests
one at a time. The model side refuses images over 120 megapixels with a clear message (and serves the next
request), and its caches stay bounded: 16 image passes, 8 predictors, the last 64 requests' downloads on disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from excelseg.cli import main

gr = pytest.importorskip("gradio")
pytest.importorskip("open_clip")

MB = 1024 * 1024


@pytest.fixture
def served(monkeypatch):
    """Record what ``excelseg app`` hands Gradio's launch and queue, without serving anything."""
    calls: dict = {}

    def queue(self, *args, **kwargs):
        calls["queue"] = kwargs
        return self

    def launch(self, *args, **kwargs):
        calls["launch"] = kwargs
        calls["blocks"] = self
        calls["analytics_env"] = os.environ.get("GRADIO_ANALYTICS_ENABLED")

    monkeypatch.setattr(gr.Blocks, "queue", queue)
    monkeypatch.setattr(gr.Blocks, "launch", launch)
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    return calls


def _parse_size(text) -> int:
    """Bytes of a Gradio ``max_file_size`` value, as Gradio reads it."""
    if isinstance(text, int):
        return text
    number, unit = float(text[:-2]), text[-2:].lower()
    return int(number * {"kb": 1024, "mb": MB, "gb": 1024 * MB}[unit])


def test_app_serves_on_loopback_without_share_link_or_analytics(served, capsys):
    assert main(["app", "--clip", "synthetic", "--device", "cpu"]) == 0
    kw = served["launch"]
    assert kw["server_name"] == "127.0.0.1" and kw["server_port"] == 7860, kw
    assert kw.get("share") is False, kw
    assert _parse_size(kw["max_file_size"]) == 100 * MB, kw["max_file_size"]
    assert served["blocks"].analytics_enabled is False
    assert served["analytics_env"] == "False"
    q = served["queue"]
    assert q["max_size"] == 64 and q["default_concurrency_limit"] == 1, q
    assert "http://127.0.0.1:7860" in capsys.readouterr().out


def test_app_host_and_port_are_passed_through(served):
    assert main(["app", "--clip", "synthetic", "--device", "cpu", "--host", "0.0.0.0", "--port", "8081"]) == 0
    kw = served["launch"]
    assert kw["server_name"] == "0.0.0.0" and kw["server_port"] == 8081 and kw.get("share") is False, kw


# ---- the model side's limits ------------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width × height`` pixels (1-bit grey) with a tiny, short image stream: readers
    must refuse it on the header, before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from excelseg import load_clip
    from excelseg.app import AppModel

    m = AppModel(load_clip("synthetic"), device="cpu", work_dir=tmp_path_factory.mktemp("app"))
    yield m
    m.close()


def _scene(folder: Path, index: int = 0, size: int = 96) -> tuple[Path, str]:
    from excelseg.synthetic import SceneGenerator

    sc = SceneGenerator(size=size, seed=21).scene(index)
    path = folder / f"scene_{index}.png"
    Image.fromarray(np.asarray(sc.image)).save(path)
    return path, ", ".join(sc.names)


def test_an_upload_over_120_megapixels_is_refused_with_a_message(model, tmp_path):
    from excelseg.app import MAX_PIXELS

    assert MAX_PIXELS == 120_000_000
    just_over = _png_header_only(tmp_path / "huge.png", 12_000, 10_001)  # 120.012 MP
    res = model.run(just_over, "red disc")
    assert not res.ok and res.status.startswith("**Error:**"), res.status
    assert "huge.png" in res.status and "120" in res.status and "pixels" in res.status, res.status
    assert str(tmp_path) not in res.status  # the user's file name, not the server's path
    good, names = _scene(tmp_path)
    assert model.run(good, names).ok  # the next request works


def test_caches_are_bounded(model, tmp_path):
    from excelseg.app import Switches

    fast = Switches(refine=False, par=False)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(17):  # 17 different images: the first leaves the 16-image cache
        p = tmp_path / f"noise_{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
        assert not model.run(p, "red disc", switches=fast).image_cached
    assert model.run(paths[-1], "blue disc", switches=fast).image_cached  # the 16 newest are kept
    assert model.run(paths[1], "blue disc", switches=fast).image_cached
    assert not model.run(paths[0], "red disc", switches=fast).image_cached  # the oldest was dropped
    # downloads: the last 64 requests' folders stay on disk
    for _ in range(45):  # with the 20 above: 65 requests in this test alone
        assert model.run(paths[-1], "red disc", switches=fast).ok
    results = [d for d in (model.work_dir / "results").iterdir() if d.is_dir()]
    assert len(results) == 64, len(results)
    # predictors: one per switch combination, at most 8 kept
    for svc in (True, False):
        for refine in (True, False):
            for par in (True, False):
                for tse in (True, False):
                    model.predictor(Switches(svc=svc, refine=refine, par=par, tse=tse))
    assert len(model._predictors) == 8  # of 16 combinations
