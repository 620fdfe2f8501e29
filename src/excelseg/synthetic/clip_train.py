"""Contrastive training of a small open_clip CLIP on generated scenes (the shipped ``synthetic`` weights).

:func:`train_clip` trains an open_clip ``CLIP`` (ViT image tower, transformer text tower, config
:data:`SYNTHETIC_CLIP_CONFIG`) on CPU with a symmetric InfoNCE loss on (scene, caption) pairs drawn fresh every
step from :class:`~excelseg.synthetic.SceneGenerator`. Images are fed exactly as the training-free pipeline
feeds them (ImageNet constants, 0–255 space, native size), so training and inference match.

* Optimiser: AdamW (no weight decay on gains, biases, embeddings and the logit scale), linear warm-up then
  cosine decay; the learnable logit scale is clamped at ln 100 (as in CLIP).
* Targets: pairs whose scenes hold the same set of classes are both positives (a row's target is spread evenly
  over them); the captions of such scenes say the same thing up to the prefix and the object order.
* Held-out check every ``eval_every`` steps: zero-shot multi-label accuracy on :data:`EVAL_SCENES` scenes of a
  different generator seed (:data:`HELDOUT_SEED`): per class the prompt ``"a photo of a {class}"``; for a scene
  with k classes, the precision of the k most similar prompts.
* Stop after ``steps`` steps or ``minutes`` of wall-clock time, whichever comes first. With a step budget the
  learning-rate schedule runs over the steps and a run is bit-for-bit reproducible (same seed, threads and
  torch build); with only a time budget it runs over the elapsed time.
* Output: ``safetensors`` (fp16 by default, loaded back as fp32 by :func:`~excelseg.weights.load_clip`) with the
  open_clip config as JSON in the metadata key ``open_clip_config``, and a sibling ``<stem>.json`` with the
  config, the training record and the file's sha256.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import Tensor, nn

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..preprocess import normalize_pixels
from ..weights import file_sha256
from ..weights.build import clip_tokenizer
from .captions import CaptionSampler
from .scenes import CLASS_NAMES, SceneGenerator

__all__ = [
    "EVAL_SCENES",
    "HELDOUT_SEED",
    "SYNTHETIC_CLIP_CONFIG",
    "build_model",
    "contrastive_loss",
    "train_clip",
    "zero_shot_accuracy",
]

#: open_clip model config of the shipped weights. The vocabulary must be CLIP's BPE (49408 tokens) so the
#: standard tokenizer works; its embedding table dominates the size, hence the narrow text tower (64 wide:
#: 49408 × 64 fp16 = 6.3 MB) that keeps the file under 10 MB. Heads are 64 wide, so a state dict alone also
#: yields this architecture. Context 40: the generator's captions are up to 38 tokens (a quarter exceed 32).
SYNTHETIC_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 96, "patch_size": 8, "width": 128, "layers": 6, "head_width": 64,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 3,
                 "mlp_ratio": 4.0},
}
HELDOUT_SEED = 987_654_321  # generator seed of the held-out scenes; training seeds must differ
EVAL_SCENES = 200
EVAL_PROMPT = "a photo of a {}"
LOGIT_SCALE_MAX = math.log(100.0)
_MASKED_LOGIT = -1.0e4  # a logit that takes no share of the softmax (−inf would make 0·log 0 = nan in the loss)


def build_model(config: dict[str, Any] | None = None, seed: int = 0) -> CLIP:
    """A freshly initialised fp32 open_clip ``CLIP`` for ``config`` (default :data:`SYNTHETIC_CLIP_CONFIG`)."""
    cfg = copy.deepcopy(config or SYNTHETIC_CLIP_CONFIG)
    torch.manual_seed(seed)
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                quick_gelu=bool(cfg.get("quick_gelu", True)))


def tokenizer_for(config: dict[str, Any]) -> Callable[..., Tensor]:
    """CLIP's BPE tokenizer with the config's context length (what :func:`~excelseg.weights.load_clip` builds)."""
    return clip_tokenizer(int(config["text_cfg"]["context_length"]))


def images_to_tensor(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 normalised with the ImageNet constants (0–255 space)."""
    return normalize_pixels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float())


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                     labels: Tensor | None = None, negative_features: Tensor | None = None,
                     negative_labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE on L2-normalised features; with multi-hot ``labels``, same-label-set pairs are positives.

    Args:
        image_features, text_features: (N, D) L2-normalised, row i of each from the same pair.
        logit_scale: 0-d, the exp of the learnt log scale.
        labels: (N, C) multi-hot classes of the pairs (``None``: only the diagonal is positive).
        negative_features: (M, D) L2-normalised extra captions (hard negatives) that only the image-to-text
            direction sees, as extra columns; ``negative_labels`` (M, C): their class sets — a column whose set
            equals an image's own set is masked out for that image instead of counting as a negative.
    """
    logits = logit_scale * image_features @ text_features.t()
    n = logits.shape[0]
    if labels is None:
        target = torch.eye(n, device=logits.device)
    else:
        target = (labels[:, None, :] == labels[None, :, :]).all(-1).float()
    target = target / target.sum(1, keepdim=True)  # symmetric, so the column targets are its transpose
    image_logits = logits
    if negative_features is not None and len(negative_features):
        extra = logit_scale * image_features @ negative_features.t()
        if labels is not None and negative_labels is not None:
            same = (labels[:, None, :] == negative_labels[None, :, :]).all(-1)
            extra = extra.masked_fill(same, _MASKED_LOGIT)
        image_logits = torch.cat([logits, extra], dim=1)
        target = torch.cat([target, target.new_zeros(n, len(negative_features))], dim=1)
    return 0.5 * (F.cross_entropy(image_logits, target) + F.cross_entropy(logits.t(), target[:, :n]))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(("ln_pre.weight",)):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of training, then cosine decay to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1.0 - warmup, 1e-8)))


class HeldOut:
    """Held-out scenes and class prompts for the zero-shot multi-label check (generated once)."""

    def __init__(self, image_size: int, n: int = EVAL_SCENES, seed: int = HELDOUT_SEED):
        images, _, labels, _ = SceneGenerator(image_size, seed=seed).batch(0, n)
        self.images = images_to_tensor(images)
        self.labels = torch.from_numpy(labels)


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, tokenizer: Callable[..., Tensor], held: HeldOut,
                       class_names: tuple[str, ...] = CLASS_NAMES, batch: int = 100) -> float:
    """Mean over scenes of the precision of the top-k class prompts, k = number of classes present."""
    was_training = model.training
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([EVAL_PROMPT.format(c) for c in class_names])), dim=-1)
    feats = torch.cat([F.normalize(model.encode_image(held.images[i:i + batch]), dim=-1)
                       for i in range(0, len(held.images), batch)])
    sims = feats @ text.t()
    hits = []
    for s, lab in zip(sims, held.labels):
        k = int(lab.sum())
        if k:
            hits.append(float(lab[s.topk(k).indices].mean()))
    model.train(was_training)
    return float(np.mean(hits)) if hits else float("nan")


def save_weights(model: nn.Module, out: str | Path, config: dict[str, Any], record: dict[str, Any],
                 fp16: bool = True) -> dict[str, Any]:
    """Write ``out`` (safetensors + config metadata) and its sibling ``<stem>.json``; returns the json dict."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        sd[k] = (v.half() if fp16 and v.is_floating_point() else v).contiguous()
    preprocess = {"mean": [m / 255.0 for m in IMAGENET_MEAN], "std": [s / 255.0 for s in IMAGENET_STD],
                  "excelseg_config": "synthetic"}  # its 96 px input and captions' wording (configs/synthetic.yaml)
    oc_config = {"model_cfg": config, "preprocess_cfg": preprocess}
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "open_clip_config": json.dumps(oc_config)})
    tmp.replace(out)
    info = {**oc_config, **record, "file": out.name, "bytes": out.stat().st_size, "sha256": file_sha256(out),
            "dtype": "float16" if fp16 else "float32"}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def training_batch(gen: SceneGenerator, sampler: CaptionSampler, step: int, batch: int, seed: int,
                   hard_negatives: float) -> tuple[np.ndarray, np.ndarray, list[str], list[str], np.ndarray]:
    """The pairs of one step: scenes ``step·batch …`` of ``gen``, captions worded by ``sampler``.

    Returns images (N, H, W, 3) uint8, multi-hot labels (N, C) float32, N captions, the hard-negative captions
    (each pair gets one with probability ``hard_negatives``) and their multi-hot labels (M, C). Wording and
    negatives draw from ``default_rng([seed, step, 1])``, apart from the scenes' own random streams.
    """
    rng = np.random.default_rng([seed, step, 1])
    images = np.empty((batch, gen.size, gen.size, 3), dtype=np.uint8)
    labels = np.zeros((batch, gen.num_classes), dtype=np.float32)
    captions, negatives, negative_labels = [], [], []
    for i in range(batch):
        scene = gen.scene(step * batch + i)
        images[i] = scene.image
        labels[i, list(scene.labels)] = 1.0
        caption, style = sampler.caption(scene, rng)
        captions.append(caption)
        if hard_negatives > 0 and rng.random() < hard_negatives:
            text, lab = sampler.hard_negative(scene, style, rng)
            negatives.append(text)
            negative_labels.append(lab)
    neg = np.stack(negative_labels) if negative_labels else np.zeros((0, gen.num_classes), dtype=np.float32)
    return images, labels, captions, negatives, neg


def load_init(spec: str | Path) -> tuple[CLIP, dict[str, Any], dict[str, Any]]:
    """Weights to continue training from (``train-clip --init``): a file written by :func:`save_weights` or the
    shipped name ``"synthetic"``. Returns the trainable fp32 model, its open_clip config and a record of where
    it came from (file name, sha256, and the steps and command of its own training when its json is next to it).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..weights import NAMED_WEIGHTS

    path = Path(spec)
    if not path.is_file() and str(spec).lower() in NAMED_WEIGHTS:
        path = Path(__file__).resolve().parents[1] / NAMED_WEIGHTS[str(spec).lower()]
    if not path.is_file():
        raise FileNotFoundError(f"--init weights not found: {spec}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "open_clip_config" not in meta:
        raise ValueError(f"{path} was not written by train-clip (no open_clip_config in its metadata)")
    config = json.loads(meta["open_clip_config"])["model_cfg"]
    model = build_model(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    record: dict[str, Any] = {"file": path.name, "sha256": file_sha256(path)}
    sibling = path.with_suffix(".json")
    if sibling.is_file():
        info = json.loads(sibling.read_text(encoding="utf-8"))
        record.update({k: info[k] for k in ("steps", "seconds", "command", "seed", "init") if k in info})
    return model, config, record


def _log(stream: TextIO | None, text: str) -> None:
    print(text, flush=True)
    if stream is not None:
        stream.write(text + "\n")
        stream.flush()


def train_clip(
    out: str | Path | None,
    *,
    minutes: float | None = 25.0,
    steps: int | None = None,
    batch: int = 64,
    seed: int = 0,
    threads: int | None = 2,
    log_every: int = 10,
    eval_every: int = 100,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    warmup: float = 0.05,
    config: dict[str, Any] | None = None,
    eval_scenes: int = EVAL_SCENES,
    log_file: str | Path | None = None,
    command: str | None = None,
    fp16: bool = True,
    model: CLIP | None = None,
    captions: str = "full",
    hard_negatives: float = 0.0,
    init: dict[str, Any] | None = None,
    schedule_steps: int | None = None,
) -> dict[str, Any]:
    """Train the synthetic CLIP; save it to ``out`` (unless ``None``); return the training record.

    The record holds ``steps``, ``seconds``, ``final_loss`` (mean of the last ``log_every`` steps),
    ``heldout_accuracy`` (final zero-shot accuracy; ``None`` with ``eval_scenes=0``) and the ``history`` of
    logged points; ``model`` is the trained model (not saved in the json). ``model`` given: continue from it
    (``init``: where it came from, :func:`load_init`, recorded in the json). ``captions`` / ``hard_negatives``:
    :class:`~excelseg.synthetic.captions.CaptionSampler` wording and the chance of a hard negative per pair.
    ``schedule_steps``: length of the learning-rate schedule in steps (default ``steps``); a run stopped early by
    ``minutes`` is re-made exactly with ``steps`` = the steps it did and ``schedule_steps`` = its ``steps``.
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (or both)")
    if seed == HELDOUT_SEED:
        raise ValueError(f"seed {HELDOUT_SEED} is the held-out generator seed; pick another")
    if threads:
        torch.set_num_threads(int(threads))
    cfg = copy.deepcopy(config or SYNTHETIC_CLIP_CONFIG)
    size = int(cfg["vision_cfg"]["image_size"])
    model = model if model is not None else build_model(cfg, seed)
    model.train()
    tokenizer = tokenizer_for(cfg)
    gen = SceneGenerator(size, seed=seed)
    sampler = CaptionSampler(captions)
    held = HeldOut(size, eval_scenes) if eval_scenes else None
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    budget = minutes * 60.0 if minutes is not None else None
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115 - closed below
    history: list[dict[str, Any]] = []
    recent: list[float] = []
    acc = None
    start = time.perf_counter()
    step = 0
    try:
        _log(log, f"train-clip: seed {seed}, batch {batch}, steps {steps}, minutes {minutes}, captions {captions}, "
                  f"hard negatives {hard_negatives}, "
                  f"threads {torch.get_num_threads()}, config {json.dumps(cfg)}")
        while True:
            elapsed = time.perf_counter() - start
            if (steps is not None and step >= steps) or (budget is not None and elapsed >= budget):
                break
            horizon = schedule_steps or steps
            progress = step / horizon if horizon is not None else elapsed / budget
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(progress, warmup)
            images, labels, texts, negatives, negative_labels = training_batch(
                gen, sampler, step, batch, seed, hard_negatives)
            x, t, y = images_to_tensor(images), tokenizer(texts), torch.from_numpy(labels)
            img_f = F.normalize(model.encode_image(x), dim=-1)
            txt_f = F.normalize(model.encode_text(t), dim=-1)
            neg_f = F.normalize(model.encode_text(tokenizer(negatives)), dim=-1) if negatives else None
            loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp(), y, neg_f,
                                    torch.from_numpy(negative_labels) if negatives else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}")
            recent = (recent + [value])[-max(1, log_every):]
            point: dict[str, Any] | None = None
            if log_every and step % log_every == 0:
                point = {"step": step, "loss": float(np.mean(recent))}
            if held is not None and eval_every and step % eval_every == 0:
                acc = zero_shot_accuracy(model, tokenizer, held)
                point = {"step": step, "loss": float(np.mean(recent)), "heldout_accuracy": acc}
            if point is not None:
                point["seconds"] = round(time.perf_counter() - start, 1)
                point["lr"] = opt.param_groups[0]["lr"]
                point["logit_scale"] = float(model.logit_scale.detach().exp())
                history.append(point)
                extra = f" held-out zero-shot acc {acc:.3f}" if "heldout_accuracy" in point else ""
                _log(log, f"step {step} loss {point['loss']:.4f} lr {point['lr']:.2e} "
                          f"scale {point['logit_scale']:.1f} {point['seconds']:.0f}s{extra}")
        seconds = time.perf_counter() - start
        if held is not None and (not history or history[-1].get("heldout_accuracy") is None
                                 or history[-1]["step"] != step):
            acc = zero_shot_accuracy(model, tokenizer, held)
        final_loss = float(np.mean(recent)) if recent else float("nan")
        record: dict[str, Any] = {
            "command": command or " ".join(sys.argv),
            "seed": seed,
            "heldout_seed": HELDOUT_SEED,
            "batch": batch,
            "threads": torch.get_num_threads(),
            "steps": step,
            "schedule_steps": schedule_steps or steps,
            "seconds": round(seconds, 1),
            "final_loss": final_loss,
            "heldout_accuracy": acc,
            "heldout_scenes": eval_scenes,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "captions": captions,
            "hard_negatives": hard_negatives,
            "init": init,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "history": history,
        }
        _log(log, f"done: {step} steps in {seconds:.0f}s, final loss {final_loss:.4f}, held-out zero-shot "
                  f"accuracy {acc if acc is None else round(acc, 4)}")
        if out is not None:
            info = save_weights(model.eval(), out, cfg, record, fp16=fp16)
            record.update(file=str(out), bytes=info["bytes"], sha256=info["sha256"])
            _log(log, f"saved {out} ({info['bytes']} bytes, sha256 {info['sha256']})")
    finally:
        if log is not None:
            log.close()
    record["model"] = model
    return record
