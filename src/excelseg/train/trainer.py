"""The ExCEL trainer (an application over the library; DESIGN "Training architecture").

Config in (:class:`~excelseg.config.PipelineConfig`, its ``train`` section), checkpoints and logs out. What lives
here and nowhere in the library: the loop, AMP, ``torchrun`` DDP, gradient accumulation, checkpoints and resume,
in-training validation, TensorBoard, the progress bar and the NaN guard. One training step is
:func:`excelseg.train.step.training_losses`.

Reproducibility and resume:

* every augmentation draws from ``numpy.random.default_rng([seed, epoch, index])`` (independent of workers and
  processes); the sample order is ``DistributedSampler(seed).set_epoch(epoch)`` every epoch (the reference replays
  epoch 0's order, EXCEL_SPEC §10.17);
* dropout draws from torch's global generator, seeded with ``seed + rank`` and saved in every checkpoint;
* a checkpoint holds the heads (``iter_NNNNNN.safetensors``, the :func:`~excelseg.io.checkpoint.save_heads` format that
  ``Segmenter``/``CamPredictor`` read) and the training state (``iter_NNNNNN.state.pt``: optimiser, AMP scaler,
  RNG states, iteration, data position, resolved config), both written atomically, then ``latest.json`` names
  the pair. A failed write (disk full, read-only) stops every process and leaves the previous pair and pointer
  intact.
  ``--resume`` continues bit-identically (CPU) — same weights as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import PipelineConfig, config_to_dict
from ..io.checkpoint import load_heads, save_checkpoint
from ..io.files import atomic_write
from ..model import ExcelModel
from .data import ResumableSampler, TrainSet, collate, labelled_indices, normalize_batch
from .dist import DistInfo, all_max
from .optim import build_optimizer, set_lrs
from .step import check_batch, training_losses, uses_lvc
from .validate import validate, validation_tables

__all__ = ["LATEST", "Trainer", "TrainingError", "config_differences", "latest_checkpoint"]

LATEST = "latest.json"
CKPT_DIR = "checkpoints"


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what was kept."""


def latest_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``latest.json`` of a run folder (or the pointer file itself) → {"heads", "state", "iteration"} paths."""
    path = Path(path).expanduser()
    pointer = path / LATEST if path.is_dir() else path
    if pointer.suffix == ".safetensors":  # a heads file: its state file next to it
        state = pointer.with_name(pointer.name.replace(".safetensors", ".state.pt"))
        return {"heads": pointer, "state": state, "iteration": None}
    if not pointer.is_file():
        raise TrainingError(f"nothing to resume: no {LATEST} in {path} (checkpoints are written every "
                            "train.checkpoint_every iterations)")
    data = json.loads(pointer.read_text())
    return {"heads": pointer.parent / data["heads"], "state": pointer.parent / data["state"],
            "iteration": int(data["iteration"])}


def config_differences(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[str]:
    """``section.key: old -> new`` for every setting that differs between two :func:`config_to_dict` dicts."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                out.append(f"{section}.{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


class Trainer:
    """Single-stage ExCEL training.

    Args:
        model: :class:`~excelseg.model.ExcelModel` (frozen CLIP + text features + heads).
        cfg: resolved settings (``train`` section drives the run).
        train_ds: a :class:`~excelseg.data.SegDataset` with image-level labels (images without any are skipped).
        out_dir: run folder (checkpoints, ``train.log``, TensorBoard ``tb/``).
        val_ds: validation split with masks (``None``: no validation).
        device: torch device; workers: DataLoader workers.
        metadata: extra checkpoint metadata (CLIP identity, dataset, class names).
        log: line printer (default: to the progress bar / stdout, and ``train.log``).
        progress: show the tqdm bar (default: when stderr is a terminal).
    """

    def __init__(self, model: ExcelModel, cfg: PipelineConfig, train_ds, out_dir: str | os.PathLike, *,
                 val_ds=None, device: str | torch.device = "cpu", workers: int = 0, dist: DistInfo | None = None,
                 metadata: dict[str, Any] | None = None, log: Callable[[str], None] | None = None,
                 progress: bool | None = None):
        from ..data.transforms import TrainAugmentation

        self.cfg, self.tcfg = cfg, cfg.train
        t = self.tcfg
        self.dist = dist or DistInfo()
        self.device = torch.device(device)
        self.out_dir = Path(out_dir).expanduser()
        self.metadata = dict(metadata or {})
        self.class_names = list(train_ds.class_names)
        self._log_fn, self.progress = log, progress
        self.stop_requested = False
        if t.amp not in ("auto", "off", "bf16", "fp16"):
            raise TrainingError(f"train.amp must be auto, off, bf16 or fp16, got {t.amp!r}")
        self.amp_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else None, "off": None,
                          "bf16": torch.bfloat16, "fp16": torch.float16}[t.amp]
        per_step = self.dist.world * t.accumulation
        if t.accumulation < 1 or t.batch_size % per_step:
            raise TrainingError(f"train.batch_size {t.batch_size} must be a multiple of processes × "
                                f"train.accumulation = {self.dist.world} × {t.accumulation}")
        self.micro_batch = t.batch_size // per_step
        ph, pw = model.encoder.patch_size
        if t.crop_size < max(ph, pw):
            raise TrainingError(f"train.crop_size {t.crop_size} is smaller than one {ph}x{pw} patch")
        if t.iterations < 1:
            raise TrainingError(f"train.iterations must be >= 1, got {t.iterations}")

        indices, missing = labelled_indices(train_ds)
        if not indices:
            raise TrainingError(f"{train_ds.kind} split {train_ds.split!r} has no image-level labels: training "
                                "needs the classes of every image (run 'excelseg prepare' with labels)")
        if len(indices) < self.micro_batch * self.dist.world:
            raise TrainingError(f"{len(indices)} labelled images cannot fill one batch of {t.batch_size}")
        self.skipped_unlabelled = missing
        if t.gt_guided_crop and not train_ds.has_masks:
            raise TrainingError("train.gt_guided_crop needs ground-truth masks in the training split")
        train_ds.with_mask = bool(t.gt_guided_crop)
        aug = TrainAugmentation(t.crop_size, tuple(t.scale_range), t.flip_prob, gt_guided_crop=t.gt_guided_crop)
        self.train_set = TrainSet(train_ds, indices, aug, t.seed)
        self.sampler = ResumableSampler(self.train_set, num_replicas=self.dist.world, rank=self.dist.rank,
                                        shuffle=True, seed=t.seed, drop_last=True)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.micro_batch, sampler=self.sampler, num_workers=workers,
            collate_fn=collate, drop_last=True, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed))
        if len(self.loader) == 0:
            raise TrainingError("the training split is smaller than one batch per process")
        if val_ds is not None and not val_ds.has_masks:
            raise TrainingError(f"validation split {val_ds.split!r} has no ground-truth masks")
        self.val_ds = val_ds

        self.model = model.to(self.device)
        self.heads = model.heads  # the raw module (checkpoints, optimiser); model.heads may become DDP
        self.model.train()
        torch.manual_seed(t.seed + self.dist.rank)
        self.optimizer = build_optimizer(self.heads, t)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model.heads = DistributedDataParallel(self.heads, device_ids=ids)
        self.iteration = 0  # optimiser steps done
        self.epoch, self.consumed = 0, 0  # data position: micro-batches consumed in the epoch
        self.last_checkpoint: Path | None = None
        self.writer = None

    # ---- logging -----------------------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        if not self.dist.main:
            return
        if self._log_fn is not None:
            self._log_fn(text)
        else:
            from tqdm import tqdm

            tqdm.write(text)
        try:
            with open(self.out_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError:
            pass

    def _open_tensorboard(self) -> None:
        if not (self.tcfg.tensorboard and self.dist.main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("TensorBoard logging is off: the 'tensorboard' package is not installed "
                     "(pip install tensorboard, or 'excelseg[train]'; train.tensorboard=false silences this)")
            return
        self.writer = SummaryWriter(str(self.out_dir / "tb"))

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"iteration": self.iteration, "epoch": self.epoch, "consumed": self.consumed,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                "config": config_to_dict(self.cfg), "world": self.dist.world, "micro_batch": self.micro_batch}

    def save_checkpoint(self) -> Path:
        """Write heads + training state of the current iteration atomically (rank 0), then ``latest.json``.

        On a write error (disk full, read-only, permissions) every process raises :class:`TrainingError`: rank 0
        tells the others through a collective, instead of leaving them at one (where they would fail with a
        broken connection, or wait for the NCCL timeout). The previous checkpoint and pointer stay as they were."""
        folder = self.out_dir / CKPT_DIR
        name = f"iter_{self.iteration:06d}"
        heads_path, state_path = folder / f"{name}.safetensors", folder / f"{name}.state.pt"
        error = None
        if self.dist.main:
            extra = {k: v for k, v in self.metadata.items() if k not in ("clip", "class_names")}
            try:  # the checkpoint format of excelseg.io.checkpoint: Segmenter / CamPredictor / segment read it directly
                save_checkpoint(heads_path, {k: v.detach().cpu() for k, v in self.heads.state_dict().items()},
                                class_names=self.metadata.get("class_names", self.class_names),
                                clip_identity=self.metadata.get("clip", "unknown"), config=self.cfg,
                                metadata={**extra, "iteration": self.iteration})
                state = self.state()
                atomic_write(state_path, lambda tmp: torch.save(state, tmp))
                pointer = {"heads": f"{CKPT_DIR}/{heads_path.name}", "state": f"{CKPT_DIR}/{state_path.name}",
                           "iteration": self.iteration}
                atomic_write(self.out_dir / LATEST, lambda tmp: Path(tmp).write_text(json.dumps(pointer)))
            except OSError as exc:
                if heads_path != self.last_checkpoint:  # no half pair left behind (none to delete when read-only)
                    for p in (heads_path, state_path):
                        with contextlib.suppress(OSError):
                            p.unlink(missing_ok=True)
                error = f"({exc.strerror or exc})"
            else:
                self._prune(folder)
        if all_max([1.0 if error else 0.0], self.device)[0]:
            kept = f"; the previous checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint else ""
            raise TrainingError(f"cannot write the checkpoint of iteration {self.iteration} to {folder} "
                                f"{error or '(rank 0 could not write it: see its message)'}{kept}")
        self.last_checkpoint = heads_path
        return heads_path

    def _prune(self, folder: Path) -> None:
        keep = max(1, self.tcfg.keep_checkpoints)
        heads = sorted(folder.glob("iter_*.safetensors"))
        for old in heads[:-keep]:
            for p in (old, old.with_name(old.name.replace(".safetensors", ".state.pt"))):
                try:
                    p.unlink()
                except OSError:
                    pass

    def resume(self, path: str | os.PathLike, force: bool = False) -> None:
        """Restore heads, optimiser, scaler, RNG states and data position from a checkpoint (run folder,
        ``latest.json`` or a heads file). A changed config is refused unless ``force`` (differences logged)."""
        ck = latest_checkpoint(path)
        if not Path(ck["state"]).is_file():
            raise TrainingError(f"training state {ck['state']} not found (a heads-only file cannot be resumed)")
        state = torch.load(ck["state"], map_location="cpu", weights_only=True)
        diffs = config_differences(state["config"], config_to_dict(self.cfg))
        if diffs and not force:
            raise TrainingError("the config differs from the checkpoint's: " + "; ".join(diffs)
                                + " (use the same config, or --force to resume anyway)")
        for d in diffs:
            self.log(f"resume --force: config changed {d}")
        if (state["world"], state["micro_batch"]) != (self.dist.world, self.micro_batch):
            self.log(f"note: resumed with {self.dist.world} process(es) × micro-batch {self.micro_batch} "
                     f"(checkpoint: {state['world']} × {state['micro_batch']}); the data order changes")
        heads_state, _ = load_heads(ck["heads"])
        try:
            self.heads.load_state_dict(heads_state, strict=True)
        except RuntimeError as exc:
            raise TrainingError(f"checkpoint {ck['heads']} does not fit this model: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.iteration, self.epoch, self.consumed = state["iteration"], state["epoch"], state["consumed"]
        self.last_checkpoint = Path(ck["heads"])
        self.log(f"resumed from {ck['heads']} at iteration {self.iteration}")

    # ---- the loop --------------------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current data position on, epoch after epoch (``set_epoch`` every epoch)."""
        while True:
            self.train_set.epoch = self.epoch
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.consumed * self.micro_batch
            for batch in self.loader:
                self.consumed += 1
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def request_stop(self) -> None:
        """Stop after the current iteration (with a checkpoint): what the first Ctrl-C does."""
        self.stop_requested = True

    def _step(self, batches) -> dict[str, float]:
        t = self.tcfg
        lr = set_lrs(self.optimizer, self.iteration, t)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "seg": 0.0, "div": 0.0}
        ddp = self.model.heads if self.dist.world > 1 else None
        for m in range(t.accumulation):
            batch = next(batches)
            images = normalize_batch(batch["image"].to(self.device, non_blocking=True), self.cfg.cam.normalization)
            labels = batch["label"].to(self.device)
            check_batch(images, labels, self.model)
            sync = ddp is None or m == t.accumulation - 1
            ctx = ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    res = training_losses(self.model, images, labels, self.iteration, t)
                values = [float(res.loss.detach()), float(res.loss_seg.detach()), float(res.loss_div.detach())]
                bad, stop = all_max([0.0 if all(map(math.isfinite, values)) else 1.0,
                                      1.0 if self.stop_requested else 0.0], self.device)
                if bad:
                    kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                            else "no checkpoint was written yet")
                    raise TrainingError(
                        f"non-finite loss at iteration {self.iteration} (loss {values[0]}, L_seg {values[1]}, "
                        f"L_div {values[2]}); stopped without saving; {kept}. Lower train.lr, try train.amp=off, "
                        "or check the input images")
                self.stop_requested = self.stop_requested or bool(stop)
                self.scaler.scale(res.loss / t.accumulation).backward()
            for k, v in zip(sums, values):
                sums[k] += v / t.accumulation
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return {**sums, "lr": lr}

    def fit(self, iterations: int | None = None) -> Path:
        """Train up to ``iterations`` optimiser steps in total (default ``train.iterations``), validating and
        checkpointing as configured; returns the last checkpoint. A first Ctrl-C (SIGINT) finishes the current
        iteration, writes a checkpoint and raises ``KeyboardInterrupt``; a second one stops at once."""
        from tqdm import tqdm

        t = self.tcfg
        total = t.iterations if iterations is None else min(int(iterations), t.iterations)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._open_tensorboard()
        self.log(f"training {total} iterations: batch {t.batch_size} = {self.dist.world} process(es) × "
                 f"{t.accumulation} accumulation × {self.micro_batch}; crop {t.crop_size}; "
                 f"{len(self.train_set)} labelled images"
                 + (f" ({self.skipped_unlabelled} without image-level labels skipped)" if self.skipped_unlabelled
                    else "")
                 + f"; LVC from iteration {t.lvc_switch_iter}; AMP {self.amp_dtype or 'off'}; device {self.device}")
        self.log("crop: GT-guided (train.gt_guided_crop=true: the reference's VOC crop, uses pixel labels)"
                 if t.gt_guided_crop else "crop: label-free random crop (train.gt_guided_crop=false)")
        previous = _install_sigint(self) if self.dist.main or self.dist.world > 1 else None
        bar = tqdm(total=total, initial=self.iteration, unit="it", desc="train", dynamic_ncols=True,
                   disable=(not self.dist.main) or (None if self.progress is None else not self.progress))
        batches = self._batches()
        try:
            tic, done_since = time.perf_counter(), 0
            while self.iteration < total:
                was_lvc = uses_lvc(self.iteration, t)
                stats = self._step(batches)
                done_since += 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", seg=f"{stats['seg']:.4f}", div=f"{stats['div']:.4f}",
                                lr=f"{stats['lr']:.3e}", refresh=False)
                it = self.iteration
                if it % max(1, t.log_every) == 0 or it == total:
                    rate = done_since / max(time.perf_counter() - tic, 1e-9)
                    self.log(f"iter {it}/{total} lr {stats['lr']:.3e} loss {stats['loss']:.4f} "
                             f"seg {stats['seg']:.4f} div {stats['div']:.4f} {rate:.3g} it/s"
                             + (" [LVC]" if was_lvc else ""))
                    if self.writer is not None:
                        for k in ("loss", "seg", "div", "lr"):
                            self.writer.add_scalar(f"train/{k}", stats[k], it)
                        self.writer.add_scalar("train/it_per_s", rate, it)
                    tic, done_since = time.perf_counter(), 0
                if self.val_ds is not None and t.val_every > 0 and (it % t.val_every == 0 or it == total):
                    self.run_validation()
                    tic, done_since = time.perf_counter(), 0
                if (t.checkpoint_every > 0 and it % t.checkpoint_every == 0) or it == total or self.stop_requested:
                    self.save_checkpoint()
                if self.stop_requested:
                    self.log(f"interrupted: checkpoint {self.last_checkpoint} written; resume with --resume")
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self.writer is not None:
                self.writer.flush()
        return self.last_checkpoint  # type: ignore[return-value]

    def run_validation(self) -> tuple[Any, Any]:
        from ..viz import overlay

        shown: list = []

        def keep_first(i, s, pseudo, seg):
            if self.writer is not None and len(shown) < 2:
                names = ["background", *self.val_ds.class_names]
                for tag, lab in (("pseudo", pseudo), ("seg", seg)):
                    img = overlay(s["image"], lab, names)
                    self.writer.add_image(f"val/{shown and 1 or 0}_{tag}", img, self.iteration, dataformats="HWC")
                shown.append(i)

        pseudo_m, seg_m = validate(self.model, self.val_ds, self.cfg, self.device, self.tcfg.val_limit, self.dist,
                                   keep_first)
        self.log(validation_tables(pseudo_m, seg_m, self.iteration))
        if self.writer is not None:
            self.writer.add_scalar("val/pseudo_miou", pseudo_m.compute()["miou"], self.iteration)
            self.writer.add_scalar("val/seg_miou", seg_m.compute()["miou"], self.iteration)
        return pseudo_m, seg_m


def _install_sigint(trainer: Trainer):
    """First SIGINT: stop after this iteration with a checkpoint; second: the default KeyboardInterrupt."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker inherited this handler: the trainer answers, once
            return
        if trainer.stop_requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print("\nstopping after this iteration (a checkpoint is written); Ctrl-C again to stop at once",
              file=sys.stderr)

    return signal.signal(signal.SIGINT, handler)
