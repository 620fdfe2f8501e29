"""The per-image batch job shared by ``cam``, ``segment`` and ``pseudo-label``: resume, overlap, progress, summary.

One :class:`ImageJob` per run. With ``overlap`` (the default, ``--no-overlap`` turns it off) the next batch is
decoded in a background thread while the caller runs the forward on the current one, and every image's outputs
are written by one background writer thread, in submission order (so an interrupted run leaves the same prefix of
finished files as an inline run would); at most :data:`MAX_PENDING_WRITES` results wait for the writer, which
bounds memory. Torch's forward and PIL's decoding/encoding release the GIL, so the job is bound by the forward,
not by I/O. Failures (unreadable images, unwritable outputs) are collected per image and reported at the end;
they never stop the run.

Imported only when a command runs (it imports tqdm); :func:`pending` and :func:`finish_run` are the resume and
summary steps on their own.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

MAX_PENDING_WRITES = 8  # results waiting for the writer thread (each holds one image's outputs)
SHOW_FAILURES = 20


def pending(paths: list, stems: list[str], out_dir: Path, finished: Callable[[str], bool],
            overwrite: bool) -> tuple[list, int]:
    """``([(path, stem)] still to do, number already done)``; ``finished(stem)`` tells a done image (atomic writes:
    an existing output is a complete one). Says how many are skipped."""
    todo = [(p, s) for p, s in zip(paths, stems) if overwrite or not finished(s)]
    skipped = len(paths) - len(todo)
    if skipped:
        print(f"{skipped} of {len(paths)} images already done in {out_dir} (use --overwrite to redo)")
    return todo, skipped


def finish_run(written: int, skipped: int, failures: list, elapsed: float, out_dir: Path, note: str = "") -> int:
    """Print the summary line of a per-image command (``note`` is added after the rate) and its failures (at most
    :data:`SHOW_FAILURES`); the exit status: 0 all done, 1 some images failed."""
    done = written + len(failures)
    rate = f" ({done / elapsed:.3g} img/s{note})" if done and elapsed > 0 else ""
    print(f"done: {written} written, {skipped} skipped, {len(failures)} failed in {elapsed:.1f} s{rate} -> {out_dir}")
    for key, reason in failures[:SHOW_FAILURES]:
        print(f"failed: {key}: {reason}", file=sys.stderr)
    if len(failures) > SHOW_FAILURES:
        print(f"failed: … and {len(failures) - SHOW_FAILURES} more", file=sys.stderr)
    return 1 if failures else 0


def decoded_batches(todo: list, batch_size: int, failures: list) -> Iterator[tuple[list, int]]:
    """``(batch, unreadable)`` per ``batch_size`` items of ``todo`` ``[(path, stem)]``: ``batch`` holds
    ``(path, stem, rgb)`` of the readable images; each unreadable one is appended to ``failures`` as
    ``(path, reason)`` and counted in ``unreadable``."""
    from ..images import ImageReadError, read_image, to_rgb_array

    for i in range(0, len(todo), batch_size):
        batch, unreadable = [], 0
        for path, stem in todo[i:i + batch_size]:
            try:
                batch.append((path, stem, to_rgb_array(read_image(path))))
            except (ImageReadError, ValueError) as exc:
                failures.append((path, str(exc)))
                unreadable += 1
        yield batch, unreadable


class ImageJob:
    """Progress, failures, overlapped decoding and background writing of one per-image run.

    Usage::

        job = ImageJob(len(todo), "cam", out_dir, skipped, overlap=not args.no_overlap)
        for batch in job.batches(todo, batch_size):      # [(path, stem, rgb)], decoded ahead
            for (path, stem, rgb), res in zip(batch, model(batch)):
                job.write(path, lambda: save(res))       # in the writer thread; OSError → a failure
        return job.finish()
    """

    def __init__(self, total: int, desc: str, out_dir: Path, skipped: int = 0, *, overlap: bool = True):
        self.out_dir, self.skipped, self.overlap = out_dir, skipped, overlap
        self.failures: list[tuple[Any, str]] = []
        self.written = 0
        self.bar = tqdm(total=total, unit="img", desc=desc, disable=None, dynamic_ncols=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="excelseg-write") if overlap else None
        self._waiting: deque[tuple[Any, Future]] = deque()
        self._start = time.perf_counter()

    def batches(self, todo: list, batch_size: int) -> Iterator[list]:
        """Decoded batches ``[(path, stem, rgb)]`` of ``todo`` ``[(path, stem)]``, decoded one batch ahead when
        overlapping; unreadable images are failures."""
        from ..batch import prefetch

        failures: list = []
        decoded = decoded_batches(todo, batch_size, failures)
        for batch, unreadable in (prefetch(decoded) if self.overlap else decoded):
            self.failures.extend(failures)
            failures.clear()
            self.bar.update(unreadable)
            if batch:
                yield batch

    def fail(self, key: Any, reason: str) -> None:
        """Record an image that produced no output."""
        self.failures.append((key, reason))
        self.bar.update(1)

    def write(self, key: Any, save: Callable[[], Any]) -> None:
        """Run ``save()`` (writes one image's outputs) in the writer thread, or now without overlap."""
        if self._writer is None:
            self._settle(key, save)
            return
        self._waiting.append((key, self._writer.submit(save)))
        while len(self._waiting) > MAX_PENDING_WRITES:
            self._collect(*self._waiting.popleft())
        while self._waiting and self._waiting[0][1].done():  # keep the progress bar current
            self._collect(*self._waiting.popleft())

    def _settle(self, key: Any, save: Callable[[], Any]) -> None:
        try:
            save()
            self.written += 1
        except OSError as exc:
            self.failures.append((key, f"cannot write outputs: {exc}"))
        self.bar.update(1)

    def _collect(self, key: Any, future: Future) -> None:
        self._settle(key, future.result)

    def close(self) -> float:
        """Wait for the pending writes, close the bar; the elapsed seconds."""
        while self._waiting:
            self._collect(*self._waiting.popleft())
        if self._writer is not None:
            self._writer.shutdown()
        self.bar.close()
        return time.perf_counter() - self._start

    def finish(self, note: str = "") -> int:
        """:meth:`close`, then the summary line and the exit status (:func:`finish_run`)."""
        elapsed = self.close()  # before reading the counts: it settles the pending writes
        return finish_run(self.written, self.skipped, self.failures, elapsed, self.out_dir, note)
