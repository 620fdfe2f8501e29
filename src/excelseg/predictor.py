"""Training-free ExCEL: CAMs and pseudo-labels for any image and any class names (paper §3.2–3.3).

:class:`CamPredictor` is the façade (in the spirit of segment-anything's ``SamPredictor``): ``set_image`` runs the
CLIP dense forward once (every scale/flip view, plus the attention affinity, which does not depend on the
classes); ``predict(class_names)`` then only encodes text (cached), aligns patches with it and refines, so asking
about other classes does not re-run the image tower.

With a checkpoint of trained heads (``CamPredictor(..., checkpoint=CKPT)``) the CAMs are the reference's
``infer_lam --training_free false`` ones (EXCEL_SPEC §4.2, parity README §4.2 path (b)): the image and its mirror
image go through the frozen CLIP together, the adapter features of that pair give the LVC shift ``E`` (relation
mean coupled over the pair) for the calibrated stream, the two LVC CAMs are combined by ``max`` (mirror flipped
back) and min–max normalised, and refinement uses the P-guided affinity (P of the image alone). Scale 1 only.

Protocol (EXCEL_SPEC §3.2): the alignment is computed against a *vocabulary* — in the paper all dataset classes
plus background words — and CAMs/labels are kept for the classes *present* in the image. With only class names,
they are both the vocabulary (plus the paper's background words) and the present classes.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .backbone import DenseEncoder
from .bank import PAPER_CLUSTERS, AttributeBank, bank_for, check_bank_identity
from .cam import surgery_cams
from .config import PipelineConfig, load_config
from .devices import resolve_device
from .io.images import to_rgb_array
from .preprocess import network_input
from .refine import box_mask, labels_from_cams, minmax_normalize, refine_cams, transition_matrix
from .text import TextEncoder, class_text_features
from .vocab import Vocabulary, normalize_name, parse_class_list
from .weights import LoadedClip, load_clip

_logger = logging.getLogger(__name__)


def multiscale_views(scales: Sequence[float], flip: bool, skip_flip_at_base: bool = False
                     ) -> list[tuple[float, bool]]:
    """``(scale, with_flip)`` per scale, in the given order: what every multi-scale + flip aggregation runs
    (CAMs here, segmentation logits in :mod:`excelseg.segmenter`). ``skip_flip_at_base``: no flip at scale 1.0
    (``infer_seg_voc.py``, EXCEL_SPEC §10.11)."""
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    return [(float(s), bool(flip) and not (skip_flip_at_base and s == 1.0)) for s in scales]


@dataclass
class ImageState:
    """What ``set_image`` keeps: one image's backbone outputs, independent of the classes asked about."""

    size: tuple[int, int]  # original (H, W)
    net_input: Tensor  # (3, h_in, w_in) normalised scale-1 input; guides PAR
    views: list[tuple[Tensor, tuple[int, int], bool]]  # per scale/flip view: features (T, E), grid, flipped
    trans: Tensor | None  # (N, N) refinement transition matrix of the scale-1 view
    combine: str = "mean"  # views combined by sum + min–max ("mean"), or max + min–max ("max": LVC with flip)


@dataclass
class CamResult:
    """Training-free result for one image; K = number of present classes."""

    class_names: list[str]  # present classes, in the order asked
    class_ids: list[int]  # label value of each class (vocabulary index + 1)
    image_size: tuple[int, int]  # (H, W)
    pseudo_label: np.ndarray  # (H, W) uint8: 0 = background, class_ids[i] for class i
    grid_cams: Tensor  # (K, h, w) refined CAMs on the patch grid, min–max normalised to [0, 1]
    raw_cams: np.ndarray  # (K, h, w) alignment CAMs before refinement, [0, 1]
    scores: Tensor  # (K+1, h', w') [bg, classes] maps after PAR whose argmax is the label (working size ≤ 1024)

    @property
    def cams(self) -> np.ndarray:
        """(K, H, W) float32 CAMs in [0, 1] at the original image size (bilinear upsampling on access)."""
        return self.cams_at(self.image_size)

    def cams_at(self, size: tuple[int, int]) -> np.ndarray:
        """(K, size[0], size[1]) float32 CAMs in [0, 1] at any size (e.g. a thumbnail of a huge image)."""
        if self.grid_cams.shape[0] == 0:
            return np.zeros((0, *size), np.float32)
        up = F.interpolate(self.grid_cams[None].float(), size=tuple(size), mode="bilinear", align_corners=False)
        return up[0].clamp_(0, 1).cpu().numpy()


# mixed precision of the CLIP forward (``precision=``): fp32 is the default and the parity setting
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# vocabularies whose (enriched) text features a predictor keeps, least recently used dropped first: a long-running
# service (``excelseg app``) asked about ever new class lists stays bounded (≈ 0.5 MB per VOC-sized entry)
TEXT_CACHE_SIZE = 32


class CamPredictor:
    """Training-free ExCEL predictor.

    Args:
        clip: a :class:`~excelseg.weights.LoadedClip`, or a spec for :func:`~excelseg.weights.load_clip`
            (open_clip tag, weight file, ``hf-hub:`` id; ``None`` → ``EXCELSEG_CLIP`` → ``ViT-B-16``).
        vocabulary: default vocabulary (``"voc"``, ``"coco"``, a list or file of names); ``None``: the class names
            given to :meth:`predict`.
        bank: TSE attribute bank (path or :class:`~excelseg.text.AttributeBank`) enriching every class;
            ``None``: plain prompts. A bank that records another CLIP's identity is refused.
        knowledge: a knowledge base (``"voc"``, ``"coco"`` or a JSON path) instead of a bank: its attribute bank
            is built once (``clusters``; default 112 for voc, 224 for coco, else ``"auto"``) and cached, and only
            the classes it describes are enriched; the others fall back to plain prompts (logged once).
        config: pipeline settings: a :class:`~excelseg.config.PipelineConfig`, a shipped config name (``"voc"``,
            ``"coco"``, ``"synthetic"``) or a YAML path; ``None``: the checkpoint's settings, else those the
            weights were made for (``clip.default_config``), else ``"voc"`` (= :data:`~excelseg.config.PAPER_VOC`).
        checkpoint: trained heads (:func:`~excelseg.interop.save_checkpoint` file or
            :class:`~excelseg.interop.HeadsCheckpoint`): LVC CAMs with flip and P-guided refinement (see the
            module docstring). Refused with other CLIP weights, or when ``vocabulary`` is not its class list;
            the default vocabulary is its class list.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``/``None``.
        precision: ``"fp32"`` (default, the parity setting), ``"bf16"`` (CUDA or CPU) or ``"fp16"`` (CUDA):
            autocast for the CLIP forward only; CAMs, refinement and PAR stay in fp32.
    """

    def __init__(self, clip: LoadedClip | str | Path | None = None, *, vocabulary=None,
                 bank: AttributeBank | str | Path | None = None, knowledge: str | Path | None = None,
                 clusters: int | str | None = None, config: PipelineConfig | str | None = None,
                 device: str | torch.device | None = None, precision: str = "fp32", checkpoint=None):
        self.device = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 autocast needs a CUDA device; use precision bf16 on the CPU")
        self.precision = precision
        self.clip = clip if isinstance(clip, LoadedClip) else load_clip(clip, device=self.device)
        self.clip.model.to(self.device)
        self.encoder = DenseEncoder(self.clip.model.visual)
        self.text_encoder = TextEncoder(self.clip.model, self.clip.tokenizer, self.clip.identity)
        self.vocabulary = None if vocabulary is None else Vocabulary.from_spec(vocabulary)
        self.heads = None
        if checkpoint is not None:
            from .io.checkpoint import HeadsCheckpoint, check_checkpoint, load_checkpoint

            ckpt = checkpoint if isinstance(checkpoint, HeadsCheckpoint) else load_checkpoint(checkpoint)
            check_checkpoint(ckpt, self.clip.identity,
                             None if self.vocabulary is None else list(self.vocabulary.names))
            if self.vocabulary is None:
                named = ckpt.meta.get("vocabulary")
                self.vocabulary = (Vocabulary.named(named) if named in ("voc", "coco")
                                   else Vocabulary.from_names(ckpt.class_names))
            self.heads = ckpt.heads().to(self.device)
            if config is None:
                config = ckpt.config
        if bank is not None and knowledge is not None:
            raise ValueError("give either a bank or a knowledge base, not both")
        self.bank = bank if bank is None or isinstance(bank, AttributeBank) else AttributeBank.load(bank)
        self.knowledge_classes: set[str] | None = None  # normalised names a knowledge base describes
        if knowledge is not None:
            from .knowledge import load_knowledge

            kb = load_knowledge(knowledge)
            if clusters is None:
                clusters = PAPER_CLUSTERS.get(str(knowledge).lower(), "auto")
            self.bank = bank_for(self.clip, kb, clusters)
            self.knowledge_classes = {normalize_name(n) for n in kb}
        if self.bank is not None:
            check_bank_identity(self.bank, self.clip)
        # settings: as given (a PipelineConfig, a shipped name or a YAML path), else those the weights were made
        # for (LoadedClip.default_config, e.g. the synthetic CLIP's 96 px input), else the paper's
        self.config = load_config(config if config is not None else self.clip.default_config)
        if self.heads is not None and (tuple(self.config.cam.scales) != (1.0,) or not self.config.refine.refine):
            raise ValueError("LVC pseudo-labels (a checkpoint) run at scale 1 with flip and refinement, as the "
                             "reference's infer_lam: use cam.scales=[1.0] and refine.refine=true")
        self._state: ImageState | None = None
        self._text_cache: OrderedDict = OrderedDict()

    # ---- image side -------------------------------------------------------------------------------------
    def _autocast(self):
        """Autocast for the CLIP forward at ``precision`` (bf16 / fp16), a no-op for fp32."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _normalization(self):
        """``cam.normalization``; ``"weights"``: the loaded weights' own mean/std (0–1 → 0–255 space)."""
        norm = self.config.cam.normalization
        if norm == "weights":
            return tuple(255.0 * m for m in self.clip.mean), tuple(255.0 * s for s in self.clip.std)
        return norm

    def _views(self) -> list[tuple[float, bool]]:
        cfg = self.config.cam
        pairs = multiscale_views([1.0] + [s for s in cfg.scales if s != 1.0], cfg.flip)
        return [(s, False) for s, _ in pairs] + [(s, True) for s, f in pairs if f]

    @torch.no_grad()
    def encode_batch(self, images: Sequence) -> list[ImageState]:
        """Run the dense forward for a batch of images (any PIL/numpy input); one state per image."""
        cfg_cam, cfg_ref = self.config.cam, self.config.refine
        rgbs = [to_rgb_array(im) for im in images]
        if self.heads is not None:
            return self._encode_lvc(rgbs)
        base_size = tuple(cfg_cam.size)
        via = self.encoder.grid_for(base_size) if cfg_cam.pos_two_step else None
        svc = self.encoder.last_blocks(cfg_cam.svc_last_blocks)
        n_aff = min(cfg_ref.affinity_layers, self.encoder.num_blocks)
        aff_blocks = self.encoder.last_blocks(n_aff)
        states = [ImageState(rgb.shape[:2], None, [], None) for rgb in rgbs]
        for scale, flipped in self._views():
            size = (int(base_size[0] * scale), int(base_size[1] * scale))
            if min(self.encoder.grid_for(size)) < 1:
                raise ValueError(f"input size {size[0]}x{size[1]} (scale {scale}) is smaller than the CLIP patch "
                                 f"size {self.encoder.patch_size[0]}; use a larger --size or scale")
            x = torch.stack([network_input(rgb, size, self._normalization(), flipped) for rgb in rgbs])
            base = scale == 1.0 and not flipped
            with self._autocast():
                out = self.encoder(x.to(self.device), svc, aff_blocks if base and cfg_ref.refine else (),
                                   head_sum=cfg_cam.svc_head_sum, pos_via_grid=via, return_tokens=False)
            if out.features.dtype != torch.float32:  # mixed precision: CLIP forward only, the rest in fp32
                out = replace(out, features=out.features.float(), attn=out.attn.float())
            for i, st in enumerate(states):
                st.views.append((out.features[i], out.grid, flipped))
            if base:
                for i, st in enumerate(states):
                    st.net_input = x[i].to(self.device)
                if cfg_ref.refine:
                    trans = transition_matrix(self._affinity(out.attn, out.attn_blocks, svc), cfg_ref.sinkhorn_iters)
                    for i, st in enumerate(states):
                        st.trans = trans[i]
        return states

    @torch.no_grad()
    def _encode_lvc(self, rgbs: list[np.ndarray]) -> list[ImageState]:
        """LVC states (``infer_lam --training_free false``): one frozen pass for [images, mirrored images]; per
        image, E from the adapter features of (image, mirror), P of the image alone (parity README §4.2 (b))."""
        from .lvc import learned_affinity, lvc_shift, p_guided_affinity, reference_attention

        cfg = self.config
        size = tuple(cfg.cam.size)
        if min(self.encoder.grid_for(size)) < 1:
            raise ValueError(f"input size {size[0]}x{size[1]} is smaller than the CLIP patch size "
                             f"{self.encoder.patch_size[0]}; use a larger --size")
        via = self.encoder.grid_for(size) if cfg.cam.pos_two_step else None
        svc = self.encoder.last_blocks(cfg.cam.svc_last_blocks)
        aff_blocks = self.encoder.last_blocks(min(cfg.refine.affinity_layers, self.encoder.num_blocks))
        x = torch.stack([network_input(rgb, size, cfg.cam.normalization) for rgb in rgbs]).to(self.device)
        n = x.shape[0]
        out = self.encoder(torch.cat([x, x.flip(-1)]), svc, aff_blocks, head_sum=cfg.cam.svc_head_sum,
                           pos_via_grid=via, return_tokens=True, keep_cache=True,
                           alias_tokens=cfg.heads.alias_features)
        fts = self.heads.eval().adapter(out.layer_tokens())
        attn = reference_attention(out.attn[:n], out.attn_blocks, out.svc_blocks, self.encoder.num_heads,
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

    def _affinity(self, attn: Tensor, blocks: tuple[int, ...], svc: tuple[int, ...]) -> Tensor:
        """(B, N, N) mean patch×patch attention of the affinity layers (EXCEL_SPEC §3.3 step 1).

        With ``head_sum_on_svc_blocks`` the calibrated blocks' maps are scaled by the head count, reproducing the
        reference's mix of head-mean (ordinary blocks) and head-sum (surgery blocks) attention weights.
        """
        scale = [float(self.encoder.num_heads) if (b in svc and self.config.refine.head_sum_on_svc_blocks) else 1.0
                 for b in blocks]
        w = torch.tensor(scale, device=attn.device, dtype=attn.dtype).view(1, -1, 1, 1)
        return (attn[:, :, 1:, 1:] * w).mean(dim=1)

    def set_image(self, image) -> CamPredictor:
        """Encode one image (PIL image in any mode, or numpy (H, W[, C]) array); returns self."""
        self._state = self.encode_batch([image])[0]
        return self

    # ---- text side --------------------------------------------------------------------------------------
    def text_features(self, vocab: Vocabulary) -> Tensor:
        """(C + M, E) (enriched) text features of a vocabulary, cached (the last :data:`TEXT_CACHE_SIZE`)."""
        key = (vocab, self.config.text, id(self.bank))
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
        else:
            rows = None
            if self.knowledge_classes is not None:
                rows = [normalize_name(n) in self.knowledge_classes or normalize_name(p) in self.knowledge_classes
                        for n, p in zip(vocab.names, vocab.prompt_names)]
                plain = [n for n, r in zip(vocab.names, rows) if not r]
                if plain:
                    _logger.warning("no descriptions in the knowledge base for %s: plain prompts used",
                                    ", ".join(plain))
            self._text_cache[key] = class_text_features(self.text_encoder, vocab, self.config.text, self.bank,
                                                        rows)
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return self._text_cache[key]

    def _resolve(self, classes, vocabulary) -> tuple[Vocabulary, list[int], list[str]]:
        vocab = Vocabulary.from_spec(vocabulary) if vocabulary is not None else self.vocabulary
        if classes is None:
            if vocab is None:
                raise ValueError("give the class names to look for, e.g. predict(['cat', 'dog'])")
            return vocab, list(range(vocab.num_classes)), list(vocab.names)
        names = parse_class_list(classes)
        if vocab is None:
            vocab = Vocabulary.from_names(names)
        idx = vocab.indices(names)
        return vocab, idx, [vocab.names[i] for i in idx]

    # ---- prediction -------------------------------------------------------------------------------------
    def predict(self, classes: Sequence[str] | str | None = None, *, vocabulary=None) -> CamResult:
        """CAMs and pseudo-label of the current image for the present ``classes``.

        Args:
            classes: class names present in the image (list, or comma list). ``None``: every vocabulary class.
            vocabulary: overrides the predictor's vocabulary for this call.
        """
        if self._state is None:
            raise RuntimeError("call set_image(image) before predict()")
        return self.predict_state(self._state, classes, vocabulary=vocabulary)

    @torch.no_grad()
    def predict_state(self, state: ImageState, classes=None, *, vocabulary=None) -> CamResult:
        """:meth:`predict` for a state from :meth:`encode_batch` (batch pipelines)."""
        vocab, present, names = self._resolve(classes, vocabulary)
        text = self.text_features(vocab)
        cfg_cam, cfg_ref = self.config.cam, self.config.refine
        base_grid = state.views[0][1]
        agg = None
        if state.combine == "max":  # LVC with flip: max(CAM, mirrored-back CAM), then min–max (1e-5)
            maps = []
            for feats, grid, flipped in state.views:
                cams = surgery_cams(feats[None], text, vocab.num_classes, cfg_cam.feature_norm,
                                    cfg_cam.cls_weight_scale)[0][present].view(len(present), *grid)
                maps.append(cams.flip(-1) if flipped else cams)
            m = torch.stack(maps).amax(dim=0)
            m = m - m.amin(dim=(-2, -1), keepdim=True)
            agg = m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-5)
        for feats, grid, flipped in ([] if agg is not None else state.views):
            cams = surgery_cams(feats[None], text, vocab.num_classes, cfg_cam.feature_norm,
                                cfg_cam.cls_weight_scale)[0][present].view(len(present), *grid)
            if flipped:
                cams = cams.flip(-1)
            if grid != base_grid:
                cams = F.interpolate(cams[None], size=base_grid, mode="bilinear", align_corners=False)[0]
            agg = cams if agg is None else agg + cams
        if len(state.views) > 1 and state.combine != "max":
            agg = minmax_normalize(agg)
        raw = agg
        if cfg_ref.refine and len(present):
            box = box_mask(raw[None], cfg_ref.box_threshold)
            refined = refine_cams(raw[None], state.trans[None], box)[0]
        else:
            refined = raw
        scores, label = labels_from_cams(refined, state.net_input, state.size, values=[0] + [i + 1 for i in present],
                                    use_par=cfg_ref.use_par, par_iters=cfg_ref.par_iters,
                                    par_dilations=cfg_ref.par_dilations, par_max_side=cfg_ref.par_max_side)
        label = label.cpu().numpy()
        return CamResult(names, [i + 1 for i in present], tuple(state.size), label, minmax_normalize(refined),
                         raw.cpu().numpy(), scores)
