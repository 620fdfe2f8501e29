"""Training-free ExCEL: CAMs and pseudo-labels for any image and any class names (paper §3.2–3.3).

:class:`CamPredictor` is a façade over one built :class:`~excelseg.model.ExcelModel` (as segment-anything's
``SamPredictor(sam)``): ``set_image`` runs the model's dense forward once (every scale/flip view, plus the
attention affinity, which does not depend on the classes); ``predict(class_names)`` then only encodes text
(cached), aligns patches with it and runs the one pseudo-label function, so asking about other classes does not
re-run the image tower. It adds image handling and caching only.

With a checkpoint of trained heads the CAMs are the reference's ``infer_lam --training_free false`` ones
(EXCEL_SPEC §4.2, parity README §4.2 path (b)): see :meth:`excelseg.model.ExcelModel.encode_images`.

Protocol (EXCEL_SPEC §3.2): the alignment is computed against a *vocabulary* — in the paper all dataset classes
plus background words — and CAMs/labels are kept for the classes *present* in the image. With only class names,
they are both the vocabulary (plus the paper's background words) and the present classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .io.images import to_rgb_array
from .model import PRECISIONS, ExcelModel, ImageState, model_attribute, multiscale_views
from .refine import minmax_normalize
from .text import TEXT_CACHE_SIZE
from .vocab import Vocabulary, parse_class_list

__all__ = ["PRECISIONS", "TEXT_CACHE_SIZE", "CamPredictor", "CamResult", "ImageState", "multiscale_views"]



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


def _batched(fn, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``[fn(t) for t in tensors]`` for a per-map ``fn`` over (K_i, h, w) tensors, as one call per (h, w): the maps
    of all images are concatenated, so the number of device operations does not grow with the batch (#22)."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape[1:]), t.dtype, t.device), []).append(i)
    for idx in groups.values():
        parts = fn(torch.cat([tensors[i] for i in idx])).split([tensors[i].shape[0] for i in idx])
        for i, part in zip(idx, parts):
            out[i] = part
    return out


def _to_host(tensors: Sequence[Tensor], one_copy: bool | None = None) -> list[np.ndarray]:
    """The tensors as numpy arrays. ``one_copy`` (default: when any is not on the CPU): one device → host copy
    for all of them (their flattened concatenation per dtype), not one per image; otherwise no copy."""
    if one_copy is None:
        one_copy = any(t.device.type != "cpu" for t in tensors)
    if not one_copy:
        return [t.numpy() for t in tensors]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[np.ndarray | None] = [None] * len(tensors)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().numpy()
        bounds = np.cumsum([0] + [tensors[i].numel() for i in idx])
        for i, a, b in zip(idx, bounds[:-1], bounds[1:]):
            out[i] = flat[a:b].reshape(tuple(tensors[i].shape))
    return out


class CamPredictor:
    """Training-free ExCEL predictor: a façade over an :class:`~excelseg.model.ExcelModel`.

    ``CamPredictor(model)`` takes a built model (:func:`excelseg.build_model`); ``CamPredictor(clip, ...)`` builds
    one with the same arguments as :func:`~excelseg.build.build_model`:

    Args:
        clip: a built :class:`~excelseg.model.ExcelModel`, a :class:`~excelseg.weights.LoadedClip`, or a spec for
            :func:`~excelseg.weights.load_clip` (open_clip tag, weight file, ``hf-hub:`` id; ``None`` →
            ``EXCELSEG_CLIP`` → ``ViT-B-16``).
        vocabulary: default vocabulary (``"voc"``, ``"coco"``, a list or file of names); ``None``: the class names
            given to :meth:`predict`.
        bank, knowledge, clusters: TSE attribute bank, or a knowledge base whose bank is built once and cached.
        config: pipeline settings (object, shipped name or YAML path); default the checkpoint's, else the
            weights' own (``clip.default_config``), else ``"voc"``.
        checkpoint: trained heads: LVC CAMs with flip and P-guided refinement.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``/``None``.
        precision: ``"fp32"`` (default, the parity setting), ``"bf16"`` (CUDA or CPU) or ``"fp16"`` (CUDA):
            autocast for the CLIP forward only; CAMs, refinement and PAR stay in fp32.
    """

    def __init__(self, clip=None, **build_args):
        if isinstance(clip, ExcelModel):
            if build_args:
                raise TypeError(f"CamPredictor(model) takes no build arguments, got {', '.join(build_args)}")
            self.model = clip
        else:
            from .build import build_model

            self.model = build_model(clip, **build_args)
        cfg = self.model.config
        if self.model.heads is not None and (tuple(cfg.cam.scales) != (1.0,) or not cfg.refine.refine):
            raise ValueError("LVC pseudo-labels (a checkpoint) run at scale 1 with flip and refinement, as the "
                             "reference's infer_lam: use cam.scales=[1.0] and refine.refine=true")
        self._state: ImageState | None = None

    # the model's parts, for callers that read them
    config = model_attribute("config")
    clip = model_attribute("clip")
    device = model_attribute("device")
    vocabulary = model_attribute("vocabulary")
    heads = model_attribute("heads")
    encoder = model_attribute("encoder")
    bank = model_attribute("text.bank")
    text_encoder = model_attribute("text.encoder")

    # ---- image side -------------------------------------------------------------------------------------
    def encode_batch(self, images: Sequence) -> list[ImageState]:
        """Run the dense forward for a batch of images (any PIL/numpy input); one state per image."""
        return self.model.encode_images([to_rgb_array(im) for im in images])

    def set_image(self, image) -> CamPredictor:
        """Encode one image (PIL image in any mode, or numpy (H, W[, C]) array); returns self."""
        self._state = self.encode_batch([image])[0]
        return self

    # ---- text side --------------------------------------------------------------------------------------
    def text_features(self, vocab: Vocabulary) -> Tensor:
        """(C + M, E) (enriched) text features of a vocabulary, cached (the last :data:`TEXT_CACHE_SIZE`)."""
        return self.model.text.features(vocab)

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

    def predict_state(self, state: ImageState, classes=None, *, vocabulary=None) -> CamResult:
        """:meth:`predict` for a state from :meth:`encode_batch` (batch pipelines)."""
        return self.predict_states([state], [classes], vocabulary=vocabulary)[0]

    @torch.no_grad()
    def predict_states(self, states: Sequence[ImageState], classes: Sequence, *, vocabulary=None
                       ) -> list[CamResult]:
        """:meth:`predict` for several states (``classes[i]`` for ``states[i]``): one batched pseudo-label call."""
        if len(classes) != len(states):
            raise ValueError(f"{len(states)} images but {len(classes)} class lists")
        resolved = [self._resolve(c, vocabulary) for c in classes]
        raws: list = [None] * len(states)
        by_vocab: dict[int, tuple] = {}  # one batched CAM call per vocabulary (one, unless calls name their own)
        for i, (vocab, _, _) in enumerate(resolved):
            by_vocab.setdefault(id(vocab), (vocab, []))[1].append(i)
        for vocab, idx in by_vocab.values():
            cams = self.model.image_cams([states[i] for i in idx], self.text_features(vocab), vocab.num_classes,
                                         [resolved[i][1] for i in idx])
            for i, c in zip(idx, cams):
                raws[i] = c
        values = [[i + 1 for i in present] for _, present, _ in resolved]
        labels = self.model.label_images(states, raws, values)
        grid = _batched(minmax_normalize, labels.refined)
        return [CamResult(names, vals, tuple(st.size), lab, g, raw, sc)
                for st, (_, _, names), vals, raw, lab, g, sc
                in zip(states, resolved, values, _to_host(raws), _to_host(labels.labels), grid, labels.scores)]
