"""``build_model``: the ONE place that loads things (CLIP weights, attribute bank, knowledge base, checkpoint,
settings) and assembles a ready :class:`~excelseg.model.ExcelModel` (as segment-anything's ``build_sam``).

Constructors take built objects and do no I/O; every client (``CamPredictor``, ``Segmenter``, the trainer, the
app, the CLI) gets its model here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .bank import AttributeBank, bank_for, check_bank_identity
from .config import PipelineConfig, load_config
from .devices import resolve_device
from .model import PRECISIONS, ExcelModel
from .text import ClassText, TextEncoder
from .vocab import Vocabulary, dataset_vocabulary, normalize_name
from .weights import LoadedClip, load_clip

__all__ = ["build_model"]


def _checkpoint(checkpoint):
    from .io.checkpoint import HeadsCheckpoint, load_checkpoint

    return checkpoint if isinstance(checkpoint, HeadsCheckpoint) else load_checkpoint(checkpoint)


def build_model(clip: LoadedClip | str | Path | None = None, *, vocabulary=None,
                bank: AttributeBank | str | Path | None = None, knowledge: str | Path | None = None,
                clusters: int | str | None = None, config: PipelineConfig | str | None = None, checkpoint=None,
                trainable: bool = False, device: str | torch.device | None = None,
                precision: str = "fp32") -> ExcelModel:
    """Load and assemble an :class:`~excelseg.model.ExcelModel`.

    Args:
        clip: a :class:`~excelseg.weights.LoadedClip` or a spec for :func:`~excelseg.weights.load_clip` (open_clip
            tag, weight file, ``hf-hub:`` id, a shipped name such as ``"synthetic"``; ``None`` → ``EXCELSEG_CLIP``
            → ``ViT-B-16``). With a checkpoint and no ``clip``: the CLIP the checkpoint records, when it is a tag
            or weights shipped with excelseg.
        vocabulary: the model's default vocabulary (``"voc"``, ``"coco"``, names, a file); with a checkpoint,
            default its class list (another class list is refused).
        bank: TSE attribute bank (path or object); refused when it records another CLIP.
        knowledge: a knowledge base (``"voc"``, ``"coco"``, ``"synthetic"``, a JSON path; the weights' own:
            ``clip.default_knowledge``) instead of a bank: its bank is built once (``clusters``: default 112 for voc,
            224 for coco, 48 for synthetic, else ``"auto"``; descriptions prefixed with ``text.template``) and
            cached; only its classes are enriched.
        config: settings (object, shipped name or YAML path); default the checkpoint's, else those the weights
            were made for (``clip.default_config``), else the paper's VOC settings.
        checkpoint: trained heads (path or :class:`~excelseg.interop.HeadsCheckpoint`): the LVC CAMs and the
            decoder; refused for other CLIP weights.
        trainable: fresh heads for training (needs ``vocabulary``; ignored with a checkpoint).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``/``None``; precision: autocast of the frozen training-free forward.
    """
    device = resolve_device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use precision bf16 on the CPU")
    vocab = None if vocabulary is None else Vocabulary.from_spec(vocabulary)
    ckpt = None if checkpoint is None else _checkpoint(checkpoint)
    if clip is None and ckpt is not None:
        from .io.checkpoint import clip_spec_of

        clip = clip_spec_of(ckpt.clip_identity)  # an open_clip tag, or the shipped weights it names
        if clip is None:
            raise ValueError(f"{ckpt.path} was made with the CLIP weight file {ckpt.clip_identity}; give that file "
                             "(clip=... / --clip)")
    clip = clip if isinstance(clip, LoadedClip) else load_clip(clip, device=device)
    clip.model.to(device)
    heads = None
    if ckpt is not None:
        from .io.checkpoint import check_checkpoint

        check_checkpoint(ckpt, clip.identity, None if vocab is None else list(vocab.names))
        if vocab is None:  # the vocabulary the heads were trained with (named, or the dataset's)
            vocab = dataset_vocabulary(ckpt.class_names, ckpt.meta.get("vocabulary") or ckpt.meta.get("dataset") or "")
        heads = ckpt.heads().to(device).eval()
        if config is None:
            config = ckpt.config
    cfg = load_config(config if config is not None else clip.default_config)
    if bank is not None and knowledge is not None:
        raise ValueError("give either a bank or a knowledge base, not both")
    bank = bank if bank is None or isinstance(bank, AttributeBank) else AttributeBank.load(bank)
    known = None
    if knowledge is not None:
        from .knowledge import DEFAULT_CLUSTERS, load_knowledge

        kb = load_knowledge(knowledge)
        if clusters is None:
            clusters = DEFAULT_CLUSTERS.get(str(knowledge).lower(), "auto")
        bank = bank_for(clip, kb, clusters, prefix=cfg.text.template)
        known = {normalize_name(n) for n in kb}
    if bank is not None:
        check_bank_identity(bank, clip)
    text = ClassText(TextEncoder(clip.model, clip.tokenizer, clip.identity), cfg.text, bank, known)
    if trainable and heads is None and vocab is None:
        raise ValueError("a trainable model needs its vocabulary (the classes the decoder predicts)")
    model = ExcelModel(clip.model.visual, None, vocab.num_classes if trainable and heads is None else None, cfg,
                       heads, text=text, clip=clip, vocabulary=vocab, precision=precision)
    return model.to(device)
