"""The one per-image job runner of ``cam``, ``segment`` and ``pseudo-label``: shards, decoding, resume, overlap,
background writes, progress and the summary.

A run is a list ``todo`` of ``(key, stem)`` pairs — an image file and its output stem, or a dataset id twice — and a
``load(key) -> (H, W, 3) uint8`` (:func:`read_rgb` for files, ``dataset.load_image`` for ids):

* :class:`Shard`: a disjoint, deterministic slice ``sorted(ids)[rank::world]`` for one of ``world`` processes
  (``--shard i/n`` or a launcher's ``RANK`` / ``WORLD_SIZE``, read by :mod:`excelseg.train.dist`); no process group
  is needed (embarrassingly parallel).
* :func:`pending`: what is still to do (atomic writes: an existing output is a complete one).
* :func:`decode`: batches of ``batch_size`` decoded by a ``DataLoader`` (``workers`` processes, or one batch ahead
  in a background thread with ``overlap``: :func:`prefetch`); an unreadable image is an error, not an exception.
* :class:`ImageJob`: one per run. With ``overlap`` (the default; ``--no-overlap`` turns it off) the next batch is
  decoded while the caller runs the forward on the current one, and every image's outputs are written by one
  background writer thread, in submission order (so an interrupted run leaves the same prefix of finished files as
  an inline run would); at most :data:`MAX_PENDING_WRITES` results wait for the writer, which bounds memory.
  Torch's forward and PIL's decoding/encoding release the GIL, so the job is bound by the forward, not by I/O.
  Failures (unreadable images, unwritable outputs) are collected per image and reported at the end
  (:func:`finish_run`); they never stop the run.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from tqdm import tqdm

from ..io.images import PathLike, read_image, to_rgb_array

__all__ = ["MAX_PENDING_WRITES", "ImageJob", "Shard", "decode", "finish_run", "pending", "prefetch", "read_rgb"]

MAX_PENDING_WRITES = 8  # results waiting for the writer thread (each holds one image's outputs)
SHOW_FAILURES = 20
_END = object()


# ---- sharding ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world``: takes ``sorted(ids)[rank::world]``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {self.rank}/{self.world}")

    def select(self, ids: Sequence[str]) -> list[str]:
        """This shard's ids: every ``world``-th of the sorted ids, from ``rank``. The shards of one ``world``
        are disjoint and together hold every id once."""
        return sorted(ids)[self.rank::self.world]

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` → ``Shard(i, n)``."""
        try:
            rank, world = (int(v) for v in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must be i/n (e.g. 0/4), got {text!r}") from None
        return cls(rank, world)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard | None:
        """The shard torchrun (or any launcher) describes with ``RANK`` and ``WORLD_SIZE``; ``None`` if unset."""
        from ..train.dist import launched

        dist = launched(environ)
        return None if dist is None else cls(dist.rank, dist.world)


# ---- resume and summary ------------------------------------------------------------------------------------


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


# ---- decoding ----------------------------------------------------------------------------------------------


def read_rgb(path: PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 (:func:`~excelseg.io.images.read_image`, EXIF applied)."""
    return to_rgb_array(read_image(path))


class _Decoded(torch.utils.data.Dataset):
    """``todo`` ``[(key, stem)]`` as ``(key, stem, rgb or None, error or None)``."""

    def __init__(self, todo: Sequence[tuple[Any, str]], load: Callable[[Any], np.ndarray]):
        self.todo, self.load = list(todo), load

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, i: int) -> tuple[Any, str, np.ndarray | None, str | None]:
        key, stem = self.todo[i]
        try:
            return key, stem, self.load(key), None
        except Exception as exc:  # noqa: BLE001 (reported per image; one bad file must not stop a run)
            return key, stem, None, " ".join(str(exc).split()) or type(exc).__name__


def _as_list(batch: list) -> list:
    return batch


def decode(todo: Sequence[tuple[Any, str]], batch_size: int, *, load: Callable[[Any], np.ndarray] = read_rgb,
           workers: int = 0, overlap: bool = False) -> Iterator[list[tuple[Any, str, np.ndarray | None, str | None]]]:
    """Batches ``[(key, stem, rgb, error)]`` of ``todo`` in order: ``rgb`` = ``load(key)``, or ``None`` with the
    one-line ``error``. ``workers`` ``DataLoader`` processes decode (0: this process; with ``overlap`` one batch
    ahead in a background thread)."""
    loader = torch.utils.data.DataLoader(_Decoded(todo, load), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_as_list)
    return prefetch(loader) if overlap and workers == 0 else iter(loader)


def prefetch(items: Iterable[Any]) -> Iterator[Any]:
    """``items``, produced one ahead by a background thread (exceptions are re-raised here, in order). Closing
    the iterator early stops the thread after the item it is producing."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_END, None))
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            q.put((_END, exc))

    thread = threading.Thread(target=produce, name="excelseg-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on the full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


# ---- the job -----------------------------------------------------------------------------------------------


class ImageJob:
    """Progress, failures, overlapped decoding and background writing of one per-image run.

    Usage::

        job = ImageJob(len(todo), "cam", out_dir, skipped, overlap=not args.no_overlap)
        for batch in job.batches(todo, batch_size):      # [(key, stem, rgb)], decoded ahead
            for (key, stem, rgb), res in zip(batch, model(batch)):
                job.write(key, lambda: save(res))        # in the writer thread; OSError → a failure
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

    def batches(self, todo: Sequence[tuple[Any, str]], batch_size: int, *,
                load: Callable[[Any], np.ndarray] = read_rgb, workers: int = 0) -> Iterator[list]:
        """Decoded batches ``[(key, stem, rgb)]`` of ``todo`` ``[(key, stem)]`` (:func:`decode`, overlapped
        when this job is); unreadable images are failures."""
        for batch in decode(todo, batch_size, load=load, workers=workers, overlap=self.overlap):
            readable = []
            for key, stem, rgb, error in batch:
                if error is None:
                    readable.append((key, stem, rgb))
                else:
                    self.fail(key, error)
            if readable:
                yield readable

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
