"""``ExcelModel``: THE model every client uses — frozen CLIP, text side, optional trained heads (DESIGN "Training
architecture"; EXCEL_SPEC §3–§5).

It owns the whole method; the predictors, the trainer, validation, the synthetic scorers and the app are clients:

* the frozen dense forward (stage (a), one pass, no autograd) with its one preamble (:meth:`ExcelModel.dense`),
  whose last-block attention is ``cam.attention`` (SVC, the paper's; or a training-free peer's, with the peer's own
  input in the training-free path when ``cam.attention_input`` is ``own``: docs/attention-modes.md);
* training-free CAMs over scale/flip views with the attention affinity (:meth:`ExcelModel.encode_images`,
  :meth:`ExcelModel.image_cams`; paper §3.2–3.3) and the LVC path of a trained adapter (EXCEL_SPEC §4.2);
* the training forward (:meth:`ExcelModel.forward`: adapter features ``F_a``, decoder logits, learned affinity
  ``P``) and the LVC CAMs re-run from the stage (a) cache (:meth:`ExcelModel.lvc_cams`, stage (b));
* the decoder's multi-scale logits for segmentation (:meth:`ExcelModel.multiscale_logits`);
* pseudo-labels through the one batched function :func:`excelseg.pseudo.pseudo_labels`.

The constructor does no I/O: it takes loaded parts (:func:`excelseg.build_model` loads them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._deprecated import moved
from .backbone import DenseEncoder, DenseOutput, SvcCache
from .cam import surgery_cams
from .config import ATTENTION_INPUTS, ATTENTION_MODES, PAPER_VOC, PipelineConfig
from .heads import ExcelHeads
from .lvc import affinity_from_attention, learned_affinity, lvc_shift, p_guided_affinity, reference_attention
from .preprocess import network_input
from .pseudo import (
    PseudoLabels,
    pad_lists,
    pad_maps,
    par_settings,
    present_classes,
    pseudo_labels,
    select_classes,
)
from .refine import minmax_normalize, transition_matrix

__all__ = ["PRECISIONS", "ExcelModel", "ExcelOutput", "ImageState", "model_attribute", "multiscale_views"]

# mixed precision of the frozen CLIP forward: fp32 is the default and the parity setting
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


@dataclass
class ImageState:
    """One image's class-independent backbone outputs (what a predictor caches per image)."""

    size: tuple[int, int]  # original (H, W)
    net_input: Tensor  # (3, h_in, w_in) normalised scale-1 input; guides PAR
    views: list[tuple[Tensor, tuple[int, int], bool]]  # per scale/flip view: features (T, E), grid, flipped
    trans: Tensor | None  # (N, N) refinement transition matrix of the scale-1 view (None: no refinement)
    combine: str = "mean"  # views combined by sum + min–max ("mean"), or max + min–max ("max": LVC with flip)


def multiscale_views(scales: Sequence[float], flip: bool, skip_flip_at_base: bool = False
                     ) -> list[tuple[float, bool]]:
    """``(scale, with_flip)`` per scale, in the given order: what every multi-scale + flip aggregation runs
    (CAMs and segmentation logits). ``skip_flip_at_base``: no flip at scale 1.0 (the reference's VOC ``segment``)."""
    return [(float(s), bool(flip) and not (skip_flip_at_base and s == 1.0)) for s in scales]


def model_attribute(path: str) -> property:
    """A read-only attribute of a façade (``CamPredictor``, ``Segmenter``) that is ``self.model.<path>``."""
    get = attrgetter(path)
    return property(lambda self: get(self.model), doc=f"``model.{path}``")


class ExcelModel(nn.Module):
    """Frozen CLIP + text side + (optional) trainable heads.

    Args:
        visual: the frozen open_clip image tower (``LoadedClip.model.visual``).
        text_features: (V, E) unit text features of the model's own vocabulary, the first ``num_classes`` rows the
            foreground classes (what training and the LVC path align with); a non-persistent buffer. ``None``:
            computed on first use from ``text`` and ``vocabulary`` (a training-free model asked about any classes
            needs neither: :meth:`image_cams` takes the text).
        num_classes: foreground classes C of ``text_features`` (the decoder outputs C + 1).
        config: pipeline settings (``cam``, ``refine``, ``heads``, ``segment`` sections).
        heads: trained heads; default: fresh :class:`~excelseg.heads.ExcelHeads` when ``num_classes`` is given,
            none for a training-free model.
        text: the text side (:class:`~excelseg.text.ClassText`) for features of any vocabulary.
        clip: the :class:`~excelseg.weights.LoadedClip` the tower belongs to (identity, normalisation constants).
        vocabulary: the default :class:`~excelseg.vocab.Vocabulary` (e.g. a checkpoint's class list).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast of the frozen forward in the training-free path.
    """

    def __init__(self, visual: nn.Module, text_features: Tensor | None = None, num_classes: int | None = None,
                 config: PipelineConfig = PAPER_VOC, heads: ExcelHeads | None = None, *, text=None, clip=None,
                 vocabulary=None, precision: str = "fp32"):
        super().__init__()
        if num_classes is None and heads is not None:
            num_classes = heads.decoder.num_outputs - 1
        if text_features is not None and not (num_classes and 0 < num_classes <= text_features.shape[0]):
            raise ValueError(f"num_classes {num_classes} must be in 1…{text_features.shape[0]} (text rows)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if config.cam.attention not in ATTENTION_MODES or config.cam.attention_input not in ATTENTION_INPUTS:
            raise ValueError(f"cam.attention / cam.attention_input must be in {ATTENTION_MODES} / {ATTENTION_INPUTS}")
        self.encoder = DenseEncoder(visual)
        self.encoder.requires_grad_(False)
        self.config = config
        self.num_classes = num_classes
        self.text, self.clip, self.vocabulary, self.precision = text, clip, vocabulary, precision
        self.register_buffer("text_features", None if text_features is None else text_features.detach().clone(),
                             persistent=False)
        hc = config.heads
        width = visual.transformer.resblocks[0].attn.in_proj_weight.shape[1]
        if heads is None and num_classes is not None:
            heads = ExcelHeads(num_classes + 1, self.encoder.num_blocks, width, hc.dim, hc.decoder_heads,
                               hc.decoder_depth, hc.dropout)
        if heads is not None and (heads.adapter.num_layers != self.encoder.num_blocks or heads.adapter.in_dim != width):
            raise ValueError(f"the heads read {heads.adapter.num_layers} layers of width {heads.adapter.in_dim}, "
                             f"but the CLIP in use has {self.encoder.num_blocks} of width {width}")
        self.heads = heads
        self.svc_blocks = self.encoder.last_blocks(config.cam.svc_last_blocks)
        self.aff_blocks = self.encoder.last_blocks(min(config.refine.affinity_layers, self.encoder.num_blocks))
        self._via = self.encoder.grid_for(tuple(config.cam.size)) if config.cam.pos_two_step else None
        self.encoder.eval()

    def train(self, mode: bool = True) -> ExcelModel:
        """Train/eval mode for the heads; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.encoder.visual.conv1.weight.device

    # ---- stage (a): the one frozen forward ------------------------------------------------------------------
    def dense(self, x: Tensor, *, affinity: bool = False, tokens: bool = False, cache: bool = False,
              svc: bool = True, attention: str | None = None, own_input: bool = False) -> DenseOutput:
        """The frozen dense forward with the model's settings (calibrated blocks, positional-embedding path).

        Args:
            x: (B, 3, H, W) normalised images.
            affinity: also return the refinement layers' attention maps; tokens: every block's tokens (the
                adapter's input, as the reference aliases them when ``heads.alias_features``); cache: the
                :class:`~excelseg.backbone.SvcCache` for the LVC re-run; svc: calibrate (``features`` wanted);
                attention: the last-block attention (default ``cam.attention``); own_input: the peers'
                positional-embedding interpolation (bicubic) instead of ExCEL's (:meth:`own_input`).
        """
        cfg = self.config
        mode = cfg.cam.attention if attention is None else attention
        alias = tokens and cfg.heads.alias_features
        return self.encoder(x.to(self.device), self.svc_blocks if ((svc and mode == "svc") or alias) else (),
                            self.aff_blocks if affinity else (), head_sum=cfg.cam.svc_head_sum,
                            attention=mode if svc else "svc", pos_via_grid=None if own_input else self._via,
                            pos_interp="bicubic" if own_input else "bilinear", return_tokens=tokens,
                            keep_cache=cache, alias_tokens=alias)

    def own_input(self, attention: str | None = None) -> bool:
        """Whether the training-free path feeds ``attention`` (default ``cam.attention``) its authors' input: CLIP
        constants (``clip-mmseg``), float64 resize, bicubic positional embedding (not for svc)."""
        mode = self.config.cam.attention if attention is None else attention
        return mode != "svc" and self.config.cam.attention_input == "own"

    def reference_attention(self, out: DenseOutput) -> Tensor:
        """(B, L_aff, N, N) the refinement layers' patch×patch attention in the reference's scale (§3.3 step 1),
        the same whatever the attention mode (the calibrated blocks' scale follows ``cam.svc_last_blocks``)."""
        return reference_attention(out.attn, out.attn_blocks, self.svc_blocks, self.encoder.num_heads,
                                   self.config.refine.head_sum_on_svc_blocks)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def own_text_features(self) -> Tensor:
        """(V, E) the text features of the model's own vocabulary (computed once from ``text`` when not given)."""
        if self.text_features is None:
            if self.text is None or self.vocabulary is None:
                raise ValueError("this model has no vocabulary of its own: give the text features of the classes")
            self.text_features = self.text.features(self.vocabulary).to(self.device)
        return self.text_features

    # ---- training forward (stage (a) + heads) ------------------------------------------------------------------
    def forward(self, images: Tensor) -> ExcelOutput:
        """(B, 3, H, W) normalised images → :class:`ExcelOutput` (one frozen CLIP pass, then the heads)."""
        if self.heads is None:
            raise ValueError("this model has no heads (training-free); build it with a checkpoint or num_classes")
        with torch.no_grad():
            out = self.dense(images, affinity=True, tokens=True, cache=True)
            tokens = out.layer_tokens()
            attn = self.reference_attention(out)
            features, cache = out.features, out.cache
            if features.dtype in (torch.float16, torch.bfloat16):  # under autocast: the frozen pass in low
                features, attn = features.float(), attn.float()  # precision; CAMs, refinement, LVC re-run in fp32
                cache = replace(cache, start=cache.start.float(), cls=cache.cls.float(),
                                maps=[m.float() for m in cache.maps], values=[v.float() for v in cache.values])
        fts, logits = self.heads(tokens)
        p, r_mean = learned_affinity(fts, self.config.heads.relation_gain, return_mean=True)
        return ExcelOutput(fts, logits, p, r_mean, features, attn, cache, out.grid)

    # ---- CAMs ---------------------------------------------------------------------------------------------------
    def cams_from_features(self, features: Tensor, grid: tuple[int, int], text: Tensor | None = None,
                           num_classes: int | None = None) -> Tensor:
        """(B, T, E) calibrated features → (B, C, h, w) CAMs in [0, 1] (EXCEL_SPEC §3.2) against ``text``
        (default the model's own text features)."""
        if text is None:
            text, num_classes = self.own_text_features(), self.num_classes
        cams = surgery_cams(features, text, num_classes, self.config.cam.feature_norm, self.config.cam.cls_weight_scale)
        return cams.view(cams.shape[0], cams.shape[1], *grid)

    @torch.no_grad()
    def static_cams(self, out: ExcelOutput) -> Tensor:
        """(B, C, h, w) training-free CAMs from the static SVC features (EXCEL_SPEC §3.2)."""
        return self.cams_from_features(out.features, out.grid)

    @torch.no_grad()
    def lvc_cams(self, out: ExcelOutput, fts: Tensor | None = None, *, shift: Tensor | None = None) -> Tensor:
        """(B, C, h, w) LVC CAMs: the SVC dual path re-run from the cache with the shift ``E`` (EXCEL_SPEC §4.2).

        ``E`` comes from ``fts`` (default ``out.adapter_fts``; detached; batch-coupled mean; at least fp32 when the
        heads ran under autocast), or is given as ``shift`` (B, N, N).
        """
        if shift is None:
            fts = out.adapter_fts if fts is None else fts
            shift = lvc_shift(fts.to(torch.promote_types(fts.dtype, torch.float32)), self.config.heads.relation_gain)
        features, _ = self.encoder.calibrate(out.cache, shift)
        return self.cams_from_features(features, out.grid)

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

    # ---- any images: training-free and LVC views ----------------------------------------------------------------
    def _check_size(self, size: tuple[int, int], scale: float = 1.0) -> None:
        if min(self.encoder.grid_for(size)) < 1:
            raise ValueError(f"input size {size[0]}x{size[1]} (scale {scale}) is smaller than the CLIP patch size "
                             f"{self.encoder.patch_size[0]}; use a larger --size or scale")

    def normalization(self, own_input: bool = False):
        """``cam.normalization`` (``"weights"``: the weights' mean/std, 0–255 space); ``own_input``: ``clip-mmseg``."""
        if own_input:
            return "clip-mmseg"
        norm = self.config.cam.normalization
        if norm == "weights":
            return tuple(255.0 * m for m in self.clip.mean), tuple(255.0 * s for s in self.clip.std)
        return norm

    def cam_views(self) -> list[tuple[float, bool]]:
        """The training-free views ``(scale, flipped)``: scale 1 first, the other scales, then their mirrors."""
        cfg = self.config.cam
        pairs = multiscale_views([1.0] + [s for s in cfg.scales if s != 1.0], cfg.flip)
        return [(s, False) for s, _ in pairs] + [(s, True) for s, f in pairs if f]

    @torch.no_grad()
    def encode_images(self, rgbs: Sequence[np.ndarray]) -> list[ImageState]:
        """Dense forward of (H, W, 3) uint8 images, one batch per view → one :class:`ImageState` per image.

        Training-free (no heads): every scale/flip view, and the attention transition matrix of the scale-1 view
        (paper §3.2–3.3). With heads: the LVC states (:meth:`_encode_lvc`).
        """
        if self.heads is not None:
            return self._encode_lvc(rgbs)
        base_size, refine, own = tuple(self.config.cam.size), self.config.refine.refine, self.own_input()
        states = [ImageState(rgb.shape[:2], None, [], None) for rgb in rgbs]
        for scale, flipped in self.cam_views():
            size = (int(base_size[0] * scale), int(base_size[1] * scale))
            self._check_size(size, scale)
            x = torch.stack([network_input(rgb, size, self.normalization(own), flipped, exact=own)
                             for rgb in rgbs]).to(self.device)
            base = scale == 1.0 and not flipped
            with self._autocast():
                out = self.dense(x, affinity=base and refine, own_input=own)
            if out.features.dtype != torch.float32:  # mixed precision: CLIP forward only, the rest in fp32
                out = replace(out, features=out.features.float(), attn=out.attn.float())
            for i, st in enumerate(states):
                st.views.append((out.features[i], out.grid, flipped))
            if base:
                trans = (transition_matrix(affinity_from_attention(self.reference_attention(out)),
                                           self.config.refine.sinkhorn_iters) if refine else None)
                for i, st in enumerate(states):
                    st.net_input = x[i]
                    st.trans = None if trans is None else trans[i]
        return states

    def _encode_lvc(self, rgbs: Sequence[np.ndarray]) -> list[ImageState]:
        """LVC states (``infer_lam --training_free false``): one frozen pass for [images, mirrored images]; per
        image, E from the adapter features of (image, mirror), P of the image alone (parity README §4.2 (b))."""
        cfg = self.config
        size = tuple(cfg.cam.size)
        self._check_size(size)
        x = torch.stack([network_input(rgb, size, cfg.cam.normalization) for rgb in rgbs]).to(self.device)
        n = x.shape[0]
        out = self.dense(torch.cat([x, x.flip(-1)]), affinity=True, tokens=True, cache=True)
        fts = self.heads.eval().adapter(out.layer_tokens())
        attn = reference_attention(out.attn[:n], out.attn_blocks, self.svc_blocks, self.encoder.num_heads,
                                   cfg.refine.head_sum_on_svc_blocks)
        gain = cfg.heads.relation_gain
        states = []
        for i, rgb in enumerate(rgbs):
            pair = [i, n + i]
            feats, _ = self.encoder.calibrate(out.cache.select(pair), lvc_shift(fts[pair], gain))
            aff, _, _ = p_guided_affinity(attn[i:i + 1], learned_affinity(fts[i:i + 1], gain))
            trans = transition_matrix(aff, cfg.refine.sinkhorn_iters)[0]
            views = [(feats[0], out.grid, False), (feats[1], out.grid, True)]
            states.append(ImageState(rgb.shape[:2], x[i], views, trans, combine="max"))
        return states

    @torch.no_grad()
    def image_cams(self, states: Sequence[ImageState], text: Tensor, num_classes: int,
                   classes: Sequence[Sequence[int]]) -> list[Tensor]:
        """(K_i, h, w) CAMs of ``classes[i]`` (vocabulary indices) for ``states[i]``, its views aggregated: mean
        views are summed (mirrors flipped back, other scales resized to the scale-1 grid) and min–max normalised
        when there are several; LVC pairs are combined by ``max`` and min–max (eps 1e-5) (EXCEL_SPEC §3.2, §4.2).

        Batched: the states whose views share grids (all of them for one ``cam.size``) run as one batch per view,
        classes padded to the batch's largest K, so the operations do not grow with the number of images."""
        out: list[Tensor | None] = [None] * len(states)
        groups: dict[tuple, list[int]] = {}
        for i, st in enumerate(states):
            groups.setdefault((st.combine, tuple((grid, flipped) for _, grid, flipped in st.views)), []).append(i)
        for (combine, views), idx in groups.items():
            sel, _ = pad_lists([classes[i] for i in idx], text.device)  # (G, K), padded with class 0
            if sel.shape[1] == 0:  # no classes asked: no maps
                for i in idx:
                    out[i] = text.new_zeros(0, *views[0][0])
                continue
            rows = torch.arange(len(idx), device=text.device)[:, None]
            base_grid = views[0][0]
            maps = []
            for v, (grid, flipped) in enumerate(views):
                feats = torch.stack([states[i].views[v][0] for i in idx])
                cams = self.cams_from_features(feats, grid, text, num_classes)[rows, sel]  # (G, k, h, w)
                if flipped:
                    cams = cams.flip(-1)
                if grid != base_grid and combine != "max":
                    cams = F.interpolate(cams, size=base_grid, mode="bilinear", align_corners=False)
                maps.append(cams)
            if combine == "max":
                agg = minmax_normalize(torch.stack(maps).amax(dim=0), eps=1e-5)
            else:
                agg = maps[0]
                for cams in maps[1:]:
                    agg = agg + cams
                agg = minmax_normalize(agg) if len(maps) > 1 else agg
            for j, i in enumerate(idx):
                out[i] = agg[j, : len(classes[i])]
        return out

    # ---- pseudo-labels (the one function, batched) ----------------------------------------------------------------
    def label_images(self, states: Sequence[ImageState], cams: Sequence[Tensor], values: Sequence[Sequence[int]],
                     box_threshold: float | None = None) -> PseudoLabels:
        """Pseudo-labels of images from :meth:`encode_images` and their (K_b, h, w) :meth:`image_cams`
        (``values``: each map's label value), in one :func:`~excelseg.pseudo.pseudo_labels` call per grid size;
        refinement and PAR as ``config.refine`` says (τ_box default ``refine.box_threshold``)."""
        ref = self.config.refine
        tau = ref.box_threshold if box_threshold is None else box_threshold
        out = PseudoLabels([None] * len(states), [None] * len(states), [None] * len(states))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(cams):
            groups.setdefault(tuple(c.shape[-2:]), []).append(i)
        for idx in groups.values():
            vals, valid = pad_lists([values[i] for i in idx], cams[idx[0]].device)
            k = vals.shape[1]
            padded = pad_maps([cams[i] for i in idx], k)
            use_trans = ref.refine and all(states[i].trans is not None for i in idx)
            trans = torch.stack([states[i].trans for i in idx]) if use_trans else None
            res = pseudo_labels(padded, vals, torch.stack([states[i].net_input for i in idx]),
                                [states[i].size for i in idx], valid=valid, trans=trans, box_threshold=tau,
                                **par_settings(ref))
            for j, i in enumerate(idx):
                out.labels[i], out.refined[i], out.scores[i] = res.labels[j], res.refined[j], res.scores[j]
        return out

    @torch.no_grad()
    def pseudo_labels(self, cams: Tensor, cls_labels: Tensor, trans: Tensor, par_images: Tensor,
                      size: tuple[int, int], box_threshold: float | None = None) -> Tensor:
        """(B, H, W) uint8 training pseudo-labels (EXCEL_SPEC §3.3–3.4): each image's present classes of the
        (B, C, h, w) ``cams`` (``cls_labels`` (B, C) multi-hot), box mask + refinement with ``trans`` (B, N, N),
        PAR guided by ``par_images`` (training: :func:`excelseg.preprocess.denormalize_uint8` of the input), at ``size``; τ_box
        default ``heads.train_box_threshold``. An image without classes is all background."""
        tau = self.config.heads.train_box_threshold if box_threshold is None else box_threshold
        classes, valid = present_classes(cls_labels)
        res = pseudo_labels(select_classes(cams, classes, valid), classes + 1, par_images, [size] * cams.shape[0],
                            valid=valid, trans=trans, box_threshold=tau, **par_settings(self.config.refine))
        return res.stacked()

    @torch.no_grad()
    def labels_from_output(self, out: ExcelOutput, x: Tensor, cls_labels: Tensor, size: tuple[int, int], *,
                           lvc: bool, guided: bool, box_threshold: float | None = None,
                           par_images: Tensor | None = None) -> Tensor:
        """(B, H, W) pseudo-labels of a :meth:`forward` output — what the trainer's step (``lvc`` and ``guided``
        per schedule, ``par_images`` the de-normalised crop), its validation (static CAMs, ``guided``) and the
        synthetic scorers compute: static or LVC CAMs, static or P-guided transition, PAR guided by ``par_images``
        (default the normalised input ``x``; EXCEL_SPEC §3.4: PAR is invariant to the normalisation up to
        rounding), τ_box default ``heads.train_box_threshold``."""
        with torch.autocast(x.device.type, enabled=False):
            cams = (self.lvc_cams(out) if lvc else self.static_cams(out)).float()
            trans, _, _ = self.transition(out, guided=guided)
            return self.pseudo_labels(cams, cls_labels, trans.float(), x if par_images is None else par_images,
                                      size, box_threshold)

    # ---- segmentation: the decoder's logits ------------------------------------------------------------------------
    @torch.no_grad()
    def decoder_logits(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) normalised inputs → (B, C + 1, h/16, w/16) decoder logits (one frozen CLIP pass)."""
        _, logits = self.heads(self.dense(x, tokens=True, svc=False).layer_tokens())
        return logits

    @torch.no_grad()
    def multiscale_logits(self, rgbs: Sequence[np.ndarray], views: Sequence[tuple[float, bool]]
                          ) -> list[list[tuple[Tensor, Tensor | None]]]:
        """Per image, per view ``(logits, flipped logits or None)`` on the patch grid (EXCEL_SPEC §6): one forward
        per scale for the whole batch, mirrored inputs included."""
        base = tuple(self.config.cam.size)
        out: list[list] = [[] for _ in rgbs]
        for scale, flipped in views:
            size = (int(base[0] * scale), int(base[1] * scale))
            self._check_size(size, scale)
            xs = [network_input(rgb, size, self.config.cam.normalization) for rgb in rgbs]
            if flipped:
                xs += [x.flip(-1) for x in xs]
            logits = self.decoder_logits(torch.stack(xs)).float()
            n = len(rgbs)
            for i in range(n):
                out[i].append((logits[i], logits[n + i] if flipped else None))
        return out

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The heads' tensors (excelseg key names, :class:`~excelseg.heads.ExcelHeads`): what checkpoints hold."""
        return {k: v.detach() for k, v in self.heads.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict`-style tensors (strict: every key, exact shapes)."""
        self.heads.load_state_dict(dict(state), strict=True)

    def trainable_parameters(self) -> Sequence[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]


__getattr__ = moved(__name__, {"denormalize_uint8": "excelseg.preprocess", "flip_max_cams": "excelseg.refine"})
