"""Configuration dataclasses, named presets and their YAML form for the training-free ExCEL pipeline.

Every number here is the value the reference implementation uses (EXCEL_SPEC §1–§3, §6); each deviation or
extension is a named field whose paper value is the default. ``PAPER_VOC`` / ``PAPER_COCO`` are the presets.

YAML: ``configs/voc.yaml``, ``coco.yaml`` and ``synthetic.yaml`` ship inside the package (:func:`load_config`
takes their name or any file path). A file has the sections ``text``, ``cam``, ``refine``, ``heads``,
``segment`` and ``train``; every key it leaves
out keeps the paper value, unknown sections or keys are refused with the list of valid ones.
:func:`apply_overrides` applies ``section.key=value`` words (values parsed as YAML: ``cam.flip=true``,
``cam.size=448``, ``cam.scales=[1,0.75]``); :func:`dump_config` writes the resolved settings back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

# ImageNet / mmseg constants in 0-255 space: what the reference feeds CLIP (EXCEL_SPEC §1, §10.5).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# CLIP's own constants, 0-255 space (offered as ``normalization="clip"``).
CLIP_MEAN = (122.770938, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)
# CLIP's constants as the mmseg configs of MaskCLIP / SCLIP / ClearCLIP / NACLIP round them (``"clip-mmseg"``)
CLIP_MMSEG_MEAN = (122.771, 116.746, 104.094)
CLIP_MMSEG_STD = (68.501, 66.632, 70.323)

# last-block attention of the dense forward (docs/attention-modes.md): ExCEL's SVC (the paper) or a peer method's
ATTENTION_MODES = ("svc", "maskclip", "sclip", "clearclip", "naclip", "none")
ATTENTION_INPUTS = ("own", "pipeline")

PAPER_TEMPLATE = "a clean origami {}."


@dataclass(frozen=True)
class TextConfig:
    """Prompting and Text Semantic Enrichment (TSE, paper §3.2 / EXCEL_SPEC §2.3)."""

    template: str = PAPER_TEMPLATE  # one prompt template; ``{}`` is replaced by the prompt name
    keep_ratio: float = 0.9  # fraction of attributes kept per class: the lowest floor((1-r)·B) logits → −inf
    temperature: float = 1.0  # softmax temperature τ over the kept attribute logits
    weight: float = 1.0  # λ: T_c = normalize(t_c + λ Σ_k w_ck a_k)
    enrich_background: bool = False  # the reference only re-normalises background prompts


@dataclass(frozen=True)
class CamConfig:
    """Dense forward, Static Visual Calibration (SVC) and patch–text alignment (EXCEL_SPEC §1.1, §3.1–3.2)."""

    size: tuple[int, int] = (320, 320)  # network input (H, W); the reference resizes without keeping aspect
    svc_last_blocks: int = 5  # SVC on the last N transformer blocks (paper: 5 → blocks 7–11 of ViT-B/16)
    svc_head_sum: bool = True  # reference: the SVC map is summed (not averaged) over heads
    pos_two_step: bool = True  # reference: pos-embedding resized to the `size` grid first, then to other grids
    normalization: str = "imagenet"  # "imagenet" (reference), "clip", or "weights": the loaded weights' mean/std
    feature_norm: str = "tokens"  # "tokens": L2 over the token axis (reference quirk); "channels": per token
    cls_weight_scale: float = 2.0  # class weights w = softmax(scale · CLS similarity) / mean
    scales: tuple[float, ...] = (1.0,)  # multi-scale CAM aggregation (paper: single scale)
    flip: bool = False  # add horizontally flipped CAMs (paper: off for training-free seeds)
    attention: str = "svc"  # last-block attention: svc (ExCEL, paper) | maskclip | sclip | clearclip | naclip | none
    attention_input: str = "own"  # for the non-svc modes: "own" = the authors' input (CLIP constants, float64
    # resize, bicubic positional embedding); "pipeline" = ExCEL's (cam.normalization, pos_two_step). Training
    # always feeds the pipeline's input (only the attention of the pseudo-labels' CAMs changes)


@dataclass(frozen=True)
class RefineConfig:
    """Attention-affinity refinement, box mask and PAR (EXCEL_SPEC §3.3–3.4)."""

    affinity_layers: int = 6  # mean of the last N layers' attention (paper: blocks 6–11)
    head_sum_on_svc_blocks: bool = True  # reference quirk: SVC blocks return head-SUMMED attention (1:12 weights)
    sinkhorn_iters: int = 3
    box_threshold: float = 0.79  # τ_box (infer_lam / VOC training)
    par_iters: int = 20
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_max_side: int = 1024  # PAR runs at the output size up to this side, then is upsampled (bounded memory)
    refine: bool = True  # False: raw CAMs → labels without affinity/box/PAR (ablation)
    use_par: bool = True


@dataclass(frozen=True)
class HeadsConfig:
    """Trainable heads (LVC adapter, decoder) and their inputs (EXCEL_SPEC §4, §5.1, §10.1)."""

    alias_features: bool = True  # reference quirk (EXCEL_SPEC §10.1): adapter slot 6 = final SVC stream, slots
    # 7–10 = block output + next block's attention residual; False feeds the clean block outputs
    dim: int = 256  # adapter / decoder width
    decoder_depth: int = 3
    decoder_heads: int = 8
    dropout: float = 0.1  # adapter Dropout2d
    relation_gain: float = 3.0  # γ in P = sigmoid(γ (R − mean R)) and in the LVC shift
    train_box_threshold: float = 0.79  # τ_box of training pseudo-labels (VOC 0.79, COCO 0.88)
    val_box_threshold: float = 0.75  # τ_box of the reference's in-training validation pseudo-labels


@dataclass(frozen=True)
class SegmentConfig:
    """Segmentation inference with trained heads (EXCEL_SPEC §6 ``infer_seg_voc.py`` / ``infer_seg_coco.py``).

    Inputs are square ``int(cam.size · s)`` resizes of the image for each scale ``s`` (aspect not kept, as the
    reference); logits of every scale are bilinearly upsampled to the output size and averaged (logits, not
    probabilities), then argmax.
    """

    scales: tuple[float, ...] = (1.0, 0.7, 1.2, 1.5)  # × cam.size; the reference's order
    flip: bool = True  # average each scale's logits with its flipped-back mirror-image logits
    skip_flip_at_base: bool = True  # VOC script quirk (EXCEL_SPEC §10.11): at scale 1.0 the flipped logits are
    # computed and discarded; the COCO script (coco.yaml) flips every scale
    logits_scale: float = 1.0  # logits are aggregated at this fraction of the image size, then upsampled to it
    # (COCO reference: 0.2, so 40k images' logits fit in memory and on disk)
    crf: bool = False  # dense CRF (10, 1, 3, 67, 3, 4) on softmax(logits) and the RGB image (``[crf]`` extra)


@dataclass(frozen=True)
class TrainConfig:
    """Single-stage ExCEL training (EXCEL_SPEC §5.2–§5.3, §10.9): schedule, augmentation, run bookkeeping.

    Iteration counts are 0-based ``n_iter`` values as in the reference (``n_iter >= lvc_switch_iter`` uses LVC).
    """

    dataset: str = "voc"  # dataset kind when `train` gets no --dataset (synthetic: generated scenes, no --root)
    train_split: str = "train_aug"  # VOC train_aug (10,582), COCO train
    val_split: str = "val"  # in-training validation split (COCO: val_part)
    iterations: int = 30000  # optimizer steps (COCO 100,000)
    batch_size: int = 4  # images per optimizer step over all processes and accumulation steps
    accumulation: int = 1  # micro-batches per optimizer step (same effective batch on a smaller GPU)
    crop_size: int = 320
    scale_range: tuple[float, ...] = (0.5, 2.0)  # random rescale ×U(low, high)
    flip_prob: float = 0.5
    gt_guided_crop: bool = False  # reference's VOC crop re-draw on the GT mask (leaks pixel labels; §10.4)
    lr: float = 1e-4  # base lr of the reference's groups 0–1; the heads' groups get lr × heads_lr_mult
    heads_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_iters: int = 50  # COCO 200
    warmup_ratio: float = 1e-6  # lr multiplier 1 − (1 − s/W)(1 − ratio) during warm-up
    poly_power: float = 1.0  # then (1 − s/iterations)^power (not shifted by the warm-up)
    lvc_switch_iter: int = 14000  # from this n_iter on: LVC CAMs + P-guided refinement (COCO 30,000)
    self_affinity_iter: int = 24000  # from this n_iter on: L_div target = own prediction (VOC); -1 never (COCO)
    div_weight: float = 0.1  # L = L_seg + div_weight · L_div
    aff_radius: int = 8
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), off, bf16, fp16
    val_every: int = 2000  # in-training validation every N iterations (0 = never; COCO 10,000)
    val_limit: int = 0  # validate on the first N images only (0 = all)
    checkpoint_every: int = 2000  # checkpoint every N iterations (and at the end, and on Ctrl-C)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    log_every: int = 20  # console / TensorBoard scalars every N iterations
    tensorboard: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    text: TextConfig = field(default_factory=TextConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def with_(self, **sections) -> PipelineConfig:
        """Return a copy with whole sections replaced, e.g. ``cfg.with_(cam=replace(cfg.cam, flip=True))``."""
        return replace(self, **sections)


PAPER_VOC = PipelineConfig()
PAPER_COCO = PipelineConfig(
    refine=RefineConfig(box_threshold=0.88), heads=HeadsConfig(train_box_threshold=0.88),
    segment=SegmentConfig(skip_flip_at_base=False, logits_scale=0.2, crf=True),
    train=TrainConfig(train_split="train", val_split="val_part", iterations=100000, warmup_iters=200,
                      lvc_switch_iter=30000, self_affinity_iter=-1, val_every=10000, checkpoint_every=10000))
PRESETS = {"paper": PAPER_VOC, "paper-voc": PAPER_VOC, "paper-coco": PAPER_COCO}


# ---- YAML configuration files ---------------------------------------------------------------------------------

SECTIONS = ("text", "cam", "refine", "heads", "segment", "train")
SHIPPED_CONFIGS = ("voc", "coco", "synthetic")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message lists what is valid."""


# settings with a fixed set of values (refused with the list of valid ones)
CHOICES = {
    ("cam", "attention"): ATTENTION_MODES,
    ("cam", "attention_input"): ATTENTION_INPUTS,
    ("cam", "feature_norm"): ("tokens", "channels"),
}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(getattr(PAPER_VOC, section))}


def _coerce(section: str, key: str, value: Any) -> Any:
    """``value`` converted to the type of ``section.key`` (lists → tuples, ``N`` → ``(N, N)`` for a size)."""
    fields = _fields(section)
    if key not in fields:
        raise ConfigError(f"unknown setting {section}.{key}; valid {section} keys: {', '.join(sorted(fields))}")
    default = getattr(getattr(PAPER_VOC, section), key)
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if key == "size" and isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where} must be a list like {list(default)}, got {value!r}")
        kind = type(default[0])
        try:
            out = tuple(kind(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a list of {kind.__name__}s, got {value!r}") from None
        if key == "size" and len(out) != 2:
            raise ConfigError(f"{where} must be N or [H, W], got {value!r}")
        return out
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return type(default)(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    choices = CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any] | None, base: PipelineConfig = PAPER_VOC, source: str = "config"
                     ) -> PipelineConfig:
    """``base`` with the settings of ``{section: {key: value}}`` (the YAML layout) applied."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected sections {', '.join(SECTIONS)} at the top level")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(str, unknown))}; valid: {', '.join(SECTIONS)}")
    cfg = base
    for section, values in data.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section} must map keys to values")
        changes = {k: check_setting(section, k, _coerce(section, k, v)) for k, v in values.items()}
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **changes)})
    return cfg


def config_to_dict(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` with lists for tuples (what :func:`dump_config` writes)."""
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def _yaml():
    import yaml

    return yaml


def load_config(spec: str | Path | PipelineConfig | None = None) -> PipelineConfig:
    """A shipped config by name (``voc``, ``coco``, ``synthetic``) or a YAML file; ``None`` → ``voc``."""
    if isinstance(spec, PipelineConfig):
        return spec
    spec = "voc" if spec is None else str(spec)
    if spec in SHIPPED_CONFIGS:
        text = resources.files("excelseg").joinpath("configs", f"{spec}.yaml").read_text(encoding="utf-8")
        source = f"{spec}.yaml (shipped)"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config {spec!r} is neither a shipped config ({', '.join(SHIPPED_CONFIGS)}) "
                                    "nor a YAML file")
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = _yaml().safe_load(text)
    except Exception as exc:  # noqa: BLE001 (yaml's error types: one message)
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    return config_from_dict(data, source=source)


def apply_overrides(cfg: PipelineConfig, overrides: Iterable[str | tuple[str, Any]]) -> PipelineConfig:
    """Apply ``"section.key=value"`` words (value parsed as YAML) or ``(section.key, value)`` pairs in order."""
    for item in overrides:
        if isinstance(item, str):
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not section.key=value")
            try:
                value = _yaml().safe_load(text) if text.strip() else ""
            except Exception:  # noqa: BLE001
                value = text
        else:
            key, value = item
        section, dot, name = key.strip().partition(".")
        if not dot or section not in SECTIONS:
            raise ConfigError(f"override {key!r}: expected section.key with a section in {', '.join(SECTIONS)}")
        cfg = config_from_dict({section: {name: value}}, base=cfg, source="override")
    return cfg


def dump_config(cfg: PipelineConfig, **extra: Any) -> str:
    """YAML text of ``cfg`` (every setting), with ``extra`` top-level entries as comments first."""
    yaml = _yaml()

    class _Dumper(yaml.SafeDumper):  # sections as blocks, lists inline: one setting per line
        pass

    _Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    head = "".join(f"# {k}: {v}\n" for k, v in extra.items())
    return head + yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                            default_flow_style=False)


# ---- valid ranges (one table; every path in — YAML, overrides, the CLI's flags — is checked against it) ----------


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``low``/``high`` bounds (``None`` = unbounded), each inclusive
    unless ``*_open``; ``text`` is how messages write it (``[0, 1]``, ``>= 1``, ``(0, 8]``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        if math.isnan(v):
            return False
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    @property
    def text(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.low is not None and self.high is not None:
            return (f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {num(self.high)}"
        return "any value"


UNIT = Range(0.0, 1.0)  # probabilities, thresholds, ratios
POSITIVE = Range(0.0, None, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
SIDE = Range(16, 4096)  # network input / crop sides in pixels
SCALE = Range(0.0, 8.0, low_open=True)  # multiples of cam.size

#: section → key → a :class:`Range` (numbers; for lists: every element), or a tuple of the valid strings.
#: Settings not listed take any value of their type.
RANGES: dict[str, dict[str, Range | tuple[str, ...]]] = {
    "text": {"keep_ratio": Range(0.0, 1.0, low_open=True), "temperature": POSITIVE, "weight": AT_LEAST_0},
    "cam": {"size": SIDE, "svc_last_blocks": Range(0, 64), "normalization": ("imagenet", "clip", "weights"),
            "feature_norm": ("tokens", "channels"), "cls_weight_scale": AT_LEAST_0, "scales": SCALE},
    "refine": {"affinity_layers": Range(1, 64), "sinkhorn_iters": Range(0, 1000), "box_threshold": UNIT,
               "par_iters": Range(0, 1000), "par_dilations": Range(1, 256), "par_max_side": Range(16, 16384)},
    "heads": {"dim": Range(1, 8192), "decoder_depth": Range(1, 64), "decoder_heads": Range(1, 256),
              "dropout": Range(0.0, 1.0, high_open=True), "relation_gain": POSITIVE, "train_box_threshold": UNIT,
              "val_box_threshold": UNIT},
    "segment": {"scales": SCALE, "logits_scale": Range(0.0, 1.0, low_open=True)},
    "train": {"dataset": ("voc", "coco", "folder", "synthetic"), "iterations": AT_LEAST_1, "batch_size": AT_LEAST_1,
              "accumulation": AT_LEAST_1, "crop_size": SIDE, "scale_range": SCALE, "flip_prob": UNIT,
              "lr": POSITIVE, "heads_lr_mult": POSITIVE, "weight_decay": AT_LEAST_0,
              "betas": Range(0.0, 1.0, high_open=True), "eps": POSITIVE, "warmup_iters": AT_LEAST_0,
              "warmup_ratio": UNIT, "poly_power": AT_LEAST_0, "lvc_switch_iter": AT_LEAST_0,
              "self_affinity_iter": Range(-1), "div_weight": AT_LEAST_0, "aff_radius": Range(1, 64),
              "seed": Range(0, 2**32 - 1), "amp": ("auto", "off", "bf16", "fp16"), "val_every": AT_LEAST_0,
              "val_limit": AT_LEAST_0, "checkpoint_every": AT_LEAST_0, "keep_checkpoints": AT_LEAST_1,
              "log_every": AT_LEAST_1},
}
#: list settings of a fixed length
LENGTHS: dict[tuple[str, str], int] = {("cam", "size"): 2, ("train", "scale_range"): 2, ("train", "betas"): 2}


def valid_range(key: str) -> Range | tuple[str, ...] | None:
    """The valid values of ``section.key`` (:data:`RANGES`), ``None`` when any value of its type is valid."""
    section, _, name = key.partition(".")
    return RANGES.get(section, {}).get(name)


def check_setting(section: str, key: str, value: Any) -> Any:
    """``value`` if it is a valid ``section.key`` (:data:`RANGES`, :data:`LENGTHS`, templates with ``{}``),
    else a :class:`ConfigError` naming the valid range."""
    where = f"{section}.{key}"
    if section == "text" and key == "template" and "{}" not in str(value):
        raise ConfigError(f"{where} must contain '{{}}' where the class name goes, got {value!r}")
    length = LENGTHS.get((section, key))
    if length is not None and len(value) != length:
        raise ConfigError(f"{where} must hold {length} values, got {list(value)}")
    if (section, key) == ("train", "scale_range") and value[0] > value[1]:
        raise ConfigError(f"{where} must be [low, high] with low <= high, got {list(value)}")
    valid = RANGES.get(section, {}).get(key)
    if valid is None:
        return value
    if isinstance(valid, tuple):
        if value not in valid:
            raise ConfigError(f"{where} must be one of {', '.join(valid)}, got {value!r}")
        return value
    values = value if isinstance(value, tuple) else (value,)
    bad = [v for v in values if v not in valid]
    if bad:
        shown = list(value) if isinstance(value, tuple) else value
        each = "every value of " if isinstance(value, tuple) else ""
        raise ConfigError(f"{each}{where} must lie in {valid.text}, got {shown!r}" if valid.low is not None
                          and valid.high is not None else f"{each}{where} must be {valid.text}, got {shown!r}")
    return value
