"""``ExcelModel``: the frozen CLIP, the precomputed text features and the trainable heads (DESIGN "Training
architecture"; EXCEL_SPEC §3–§5).

One forward (:meth:`ExcelModel.forward`) runs the frozen ViT **once** without autograd (stage (a)): per-layer
patch tokens for the adapter, the static SVC features, the attention maps of the refinement layers and a cache of
the calibrated blocks (:class:`~excelseg.backbone.SvcCache`). The heads then give the adapter features ``F_a``,
the decoder logits and the learned affinity ``P`` (with gradient). LVC CAMs (:meth:`ExcelModel.lvc_cams`) re-run
only the calibrated stream from the cache with the shift ``E`` of the adapter features (stage (b)).

Pseudo-labels reuse the training-free functions (:func:`~excelseg.cam.surgery_cams`,
:func:`~excelseg.refine.box_mask`, :func:`~excelseg.refine.refine_cams`, :func:`~excelseg.refine.labels_from_cams`).
The constructor does no I/O: it takes a loaded CLIP model and text features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .backbone import DenseEncoder, SvcCache
from .cam import surgery_cams
from .config import PAPER_VOC, PipelineConfig
from .heads import ExcelHeads
from .lvc import affinity_from_attention, learned_affinity, lvc_shift, p_guided_affinity, reference_attention
from .preprocess import Normalization, normalization_constants
from .refine import box_mask, class_scores, labels_from_cams, minmax_normalize, refine_cams, transition_matrix

__all__ = ["ExcelModel", "ExcelOutput", "denormalize_uint8", "flip_max_cams"]


@dataclass
class ExcelOutput:
    """Named outputs of :meth:`ExcelModel.forward`; N = h·w patch tokens (row-major), T = N + 1, C classes."""

    adapter_fts: Tensor  # (B, dim, h, w) F_a (gradient to the adapter)
    seg_logits: Tensor  # (B, C+1, h, w) decoder logits at the patch grid
    affinity: Tensor  # (B, N, N) learned affinity P = sigmoid(γ (R − mean R)), batch-coupled mean
    relation_mean: Tensor  # 0-d batch mean of R (the constant inside P)
    features: Tensor  # (B, T, E) static SVC features (no gradient)
    attn: Tensor  # (B, L_aff, N, N) refinement layers' patch×patch attention in the reference's scale
    cache: SvcCache  # stage (a) cache for the LVC dual path
    grid: tuple[int, int]  # (h, w)


def flip_max_cams(cams: Tensor, cams_flipped: Tensor) -> Tensor:
    """Flip-augmented CAMs as the reference's LVC inference combines them (parity README §4.2 ``cam_lvc_flip``).

    Args:
        cams: (B, C, h, w) CAMs of the images; cams_flipped: (B, C, h, w) CAMs of the mirrored images.

    Returns:
        (B, C, h, w) ``max(cams, mirror(cams_flipped))``, then per map ``(m − min) / (max(m − min) + 1e-5)``.
    """
    return minmax_normalize(torch.maximum(cams, cams_flipped.flip(-1)), eps=1e-5)


def denormalize_uint8(x: Tensor, normalization: Normalization = "imagenet") -> Tensor:
    """(B, 3, H, W) normalised input → the training PAR image: ``uint8(x·std + mean) / 255`` (truncation, as the
    reference's ``denormalize_img2``; parity README §3.3 "PAR image")."""
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                 for v in normalization_constants(normalization))
    return (x * std + mean).clamp_(0, 255).floor_() / 255


class ExcelModel(nn.Module):
    """Frozen CLIP + text features + trainable heads.

    Args:
        visual: the frozen open_clip image tower (``LoadedClip.model.visual``).
        text_features: (V, E) unit text features, the first ``num_classes`` rows the foreground classes
            (e.g. :meth:`excelseg.CamPredictor.text_features`); kept as a non-persistent buffer.
        num_classes: foreground classes C (decoder outputs C + 1).
        config: pipeline settings (``cam``, ``refine`` and ``heads`` sections).
        heads: trainable heads; default freshly initialised :class:`~excelseg.heads.ExcelHeads`.
    """

    def __init__(self, visual: nn.Module, text_features: Tensor, num_classes: int,
                 config: PipelineConfig = PAPER_VOC, heads: ExcelHeads | None = None):
        super().__init__()
        if not 0 < num_classes <= text_features.shape[0]:
            raise ValueError(f"num_classes {num_classes} must be in 1…{text_features.shape[0]} (text rows)")
        self.encoder = DenseEncoder(visual)
        self.encoder.requires_grad_(False)
        self.config = config
        self.num_classes = num_classes
        self.register_buffer("text_features", text_features.detach().clone(), persistent=False)
        hc = config.heads
        width = visual.transformer.resblocks[0].attn.in_proj_weight.shape[1]
        self.heads = heads if heads is not None else ExcelHeads(
            num_classes + 1, self.encoder.num_blocks, width, hc.dim, hc.decoder_heads, hc.decoder_depth, hc.dropout)
        self.svc_blocks = self.encoder.last_blocks(config.cam.svc_last_blocks)
        self.aff_blocks = self.encoder.last_blocks(min(config.refine.affinity_layers, self.encoder.num_blocks))
        self.encoder.eval()

    def train(self, mode: bool = True) -> ExcelModel:
        """Train/eval mode for the heads; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    # ---- stage (a) + heads ----------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> ExcelOutput:
        """(B, 3, H, W) normalised images → :class:`ExcelOutput` (one frozen CLIP pass)."""
        cfg = self.config
        via = self.encoder.grid_for(tuple(cfg.cam.size)) if cfg.cam.pos_two_step else None
        with torch.no_grad():
            out = self.encoder(images, self.svc_blocks, self.aff_blocks, head_sum=cfg.cam.svc_head_sum,
                               pos_via_grid=via, return_tokens=True, keep_cache=True,
                               alias_tokens=cfg.heads.alias_features)
            tokens = out.layer_tokens()
            attn = reference_attention(out.attn, out.attn_blocks, out.svc_blocks, self.encoder.num_heads,
                                       cfg.refine.head_sum_on_svc_blocks)
            features, cache = out.features, out.cache
            if features.dtype != torch.float32:  # under autocast: the frozen pass in low precision, CAMs,
                features, attn = features.float(), attn.float()  # refinement and the LVC re-run in fp32
                cache = replace(cache, start=cache.start.float(), cls=cache.cls.float(),
                                maps=[m.float() for m in cache.maps], values=[v.float() for v in cache.values])
        fts, logits = self.heads(tokens)
        p, r_mean = learned_affinity(fts, cfg.heads.relation_gain, return_mean=True)
        return ExcelOutput(fts, logits, p, r_mean, features, attn, cache, out.grid)

    # ---- CAMs ---------------------------------------------------------------------------------------------------
    def cams_from_features(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, T, E) calibrated features → (B, C, h, w) CAMs in [0, 1] (EXCEL_SPEC §3.2)."""
        cams = surgery_cams(features, self.text_features, self.num_classes, self.config.cam.feature_norm,
                            self.config.cam.cls_weight_scale)
        return cams.view(cams.shape[0], cams.shape[1], *grid)

    @torch.no_grad()
    def static_cams(self, out: ExcelOutput) -> Tensor:
        """(B, C, h, w) training-free CAMs from the static SVC features (EXCEL_SPEC §3.2)."""
        return self.cams_from_features(out.features, out.grid)

    @torch.no_grad()
    def lvc_cams(self, out: ExcelOutput, fts: Tensor | None = None, *, shift: Tensor | None = None) -> Tensor:
        """(B, C, h, w) LVC CAMs: the SVC dual path re-run from the cache with the shift ``E`` (EXCEL_SPEC §4.2).

        ``E`` comes from ``fts`` (default ``out.adapter_fts``; detached; batch-coupled mean), or is given as
        ``shift`` (B, N, N).
        """
        if shift is None:
            shift = lvc_shift(out.adapter_fts if fts is None else fts, self.config.heads.relation_gain)
        features, _ = self.encoder.calibrate(out.cache, shift)
        return self.cams_from_features(features, out.grid)

    # ---- refinement and pseudo-labels --------------------------------------------------------------------------
    @torch.no_grad()
    def transition(self, out: ExcelOutput, guided: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Refinement transition matrix (B, N, N) (EXCEL_SPEC §3.3 steps 1–2).

        ``guided``: P-guided layer selection and product (then also ``layer_diff`` and ``kept``, (B, L) each);
        otherwise the static layer mean.
        """
        if guided:
            aff, diff, kept = p_guided_affinity(out.attn, out.affinity.detach())
        else:
            aff, diff, kept = affinity_from_attention(out.attn), None, None
        return transition_matrix(aff, self.config.refine.sinkhorn_iters), diff, kept

    @torch.no_grad()
    def pseudo_labels(self, cams: Tensor, cls_labels: Tensor, trans: Tensor, par_images: Tensor,
                      size: tuple[int, int], box_threshold: float | None = None) -> Tensor:
        """Pseudo-labels from CAMs (EXCEL_SPEC §3.3–3.4), per image for its present classes.

        Args:
            cams: (B, C, h, w) CAMs in [0, 1]; cls_labels: (B, C) multi-hot image labels.
            trans: (B, N, N) transition matrices (:meth:`transition`).
            par_images: (B, 3, H', W') images guiding PAR (training: :func:`denormalize_uint8` of the input).
            size: output (H, W); box_threshold: τ_box (default ``config.heads.train_box_threshold``).

        Returns:
            (B, H, W) uint8 labels, 0 = background, c + 1 for class c. Batched on the device (the images'
            class counts padded) with the training-free functions; an image without classes is all background.
        """
        tau = self.config.heads.train_box_threshold if box_threshold is None else box_threshold
        ref = self.config.refine
        par_kw = {"use_par": ref.use_par, "par_iters": ref.par_iters, "par_dilations": ref.par_dilations}
        if max(size) > ref.par_max_side:  # memory-bounded path of labels_from_cams, one image at a time
            labels = []
            for b in range(cams.shape[0]):
                present = torch.nonzero(cls_labels[b] > 0).flatten()
                sel = cams[b, present][None]
                refined = refine_cams(sel, trans[b][None], box_mask(sel, tau))[0]
                labels.append(labels_from_cams(refined, par_images[b], size, values=[0] + (present + 1).tolist(),
                                               par_max_side=ref.par_max_side, **par_kw)[1])
            return torch.stack(labels)
        # batched: each image's present classes first (ascending), padded with all-zero maps to the batch's max K
        present = cls_labels > 0
        b, _, h, w = cams.shape
        k = int(present.sum(dim=1).max()) if present.numel() else 0
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :k]  # (B, K)
        valid = present.gather(1, order)
        sel = cams.gather(1, order[:, :, None, None].expand(b, k, h, w)) * valid[:, :, None, None].to(cams.dtype)
        refined = refine_cams(sel, trans, box_mask(sel, tau))
        scores = class_scores(refined, par_images, size, valid=valid, **par_kw)
        lut = torch.cat([order.new_zeros(b, 1), order + 1], dim=1).to(torch.uint8)  # channel → label value
        return lut.gather(1, scores.max(dim=1).indices.flatten(1)).view(b, *size)

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The heads' tensors (excelseg key names, :class:`~excelseg.heads.ExcelHeads`): what checkpoints hold."""
        return {k: v.detach() for k, v in self.heads.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict`-style tensors (strict: every key, exact shapes)."""
        self.heads.load_state_dict(dict(state), strict=True)

    def trainable_parameters(self) -> Sequence[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

