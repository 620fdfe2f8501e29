"""The per-image job of cam / segment / pseudo-label: prefetching, background writes, failures, and the same
outputs with and without the I/O overlap (issue: a batch job bound by the forward, not by I/O)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from excelseg.cli import main
from excelseg.jobs.runner import MAX_PENDING_WRITES, ImageJob, prefetch
from tiny_clip import save_tiny


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_prefetch_keeps_order_and_reraises_in_place():
    def items():
        yield from range(5)
        raise ValueError("bad item 5")

    it = prefetch(items())
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]  # everything before the failure arrives, in order
    with pytest.raises(ValueError, match="bad item 5"):
        next(it)


def test_prefetch_runs_ahead_and_stops_when_closed():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = prefetch(items())
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:  # the producer decodes the next item meanwhile
        time.sleep(0.01)
    assert len(produced) >= 2
    it.close()
    assert "excelseg-decode" not in _threads()  # the thread ended
    assert len(produced) <= 4  # one item in the queue, one being produced: it did not run on to the end


def test_writes_in_order_and_failures_do_not_stop_the_job(tmp_path, capsys):
    job = ImageJob(30, "test", tmp_path, skipped=2, overlap=True)
    order = []

    def save(i):
        if i == 7:
            raise OSError("disk full")
        time.sleep(0.002 * (i % 3))  # uneven write times
        order.append(i)

    for i in range(29):
        job.write(f"img{i}", lambda i=i: save(i))
        assert len(job._waiting) <= MAX_PENDING_WRITES  # memory stays bounded
    job.fail("img29", "cannot read image")
    assert job.finish() == 1
    assert order == [i for i in range(29) if i != 7]  # one writer thread: submission order
    out = capsys.readouterr()
    assert "done: 28 written, 2 skipped, 2 failed" in out.out
    assert "failed: img7: cannot write outputs: disk full" in out.err and "failed: img29: cannot read image" in out.err


def test_a_bug_in_a_write_is_not_swallowed(tmp_path):
    job = ImageJob(1, "test", tmp_path, overlap=True)
    with pytest.raises(ZeroDivisionError):  # surfaces at the next write or at the end, whichever settles it
        job.write("x", lambda: 1 / 0)
        job.finish()


@pytest.mark.parametrize("batch", ["1", "2"])
def test_cam_outputs_identical_with_and_without_overlap(tmp_path, batch):
    weights = save_tiny(tmp_path / "tiny.pt", layers=6, patch=16, image=64, heads=1)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(60, 80), (90, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"img{i}.png")
    (photos / "broken.jpg").write_bytes(b"not an image")
    outs = {}
    for mode in ("overlap", "inline"):
        outs[mode] = tmp_path / mode
        extra = ["--no-overlap"] if mode == "inline" else []
        assert main(["cam", str(photos), "--classes", "cat,dog", "--clip", str(weights), "--size", "64",
                     "--out-dir", str(outs[mode]), "--save-cams", "--batch-size", batch, *extra]) == 1  # broken.jpg
    names = sorted(p.name for p in outs["overlap"].iterdir() if p.suffix in (".png", ".npz"))
    assert names == sorted(p.name for p in outs["inline"].iterdir() if p.suffix in (".png", ".npz"))
    assert len(names) == 6
    for name in names:
        if name.endswith(".png"):
            a, b = (np.asarray(Image.open(outs[m] / name)) for m in ("overlap", "inline"))
            assert np.array_equal(a, b), name
        else:
            with np.load(outs["overlap"] / name) as a, np.load(outs["inline"] / name) as b:
                assert np.array_equal(a["cams"], b["cams"]), name
