"""Configuration dataclasses and named presets for the training-free ExCEL pipeline.

Every number here is the value the reference implementation uses (EXCEL_SPEC §1–§3, §6); each deviation or
extension is a named field whose paper value is the default. ``PAPER_VOC`` / ``PAPER_COCO`` are the presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# ImageNet / mmseg constants in 0-255 space: what the reference feeds CLIP (EXCEL_SPEC §1, §10.5).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# CLIP's own constants, 0-255 space (offered as ``normalization="clip"``).
CLIP_MEAN = (122.770938, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)

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
    normalization: str = "imagenet"  # "imagenet" (reference) or "clip"
    feature_norm: str = "tokens"  # "tokens": L2 over the token axis (reference quirk); "channels": per token
    cls_weight_scale: float = 2.0  # class weights w = softmax(scale · CLS similarity) / mean
    scales: tuple[float, ...] = (1.0,)  # multi-scale CAM aggregation (paper: single scale)
    flip: bool = False  # add horizontally flipped CAMs (paper: off for training-free seeds)


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
class PipelineConfig:
    text: TextConfig = field(default_factory=TextConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def with_(self, **sections) -> PipelineConfig:
        """Return a copy with whole sections replaced, e.g. ``cfg.with_(cam=replace(cfg.cam, flip=True))``."""
        return replace(self, **sections)


PAPER_VOC = PipelineConfig()
PAPER_COCO = PipelineConfig(refine=RefineConfig(box_threshold=0.88), heads=HeadsConfig(train_box_threshold=0.88))
PRESETS = {"paper": PAPER_VOC, "paper-voc": PAPER_VOC, "paper-coco": PAPER_COCO}
