"""Prompts, text features and Text Semantic Enrichment (paper §3.2; EXCEL_SPEC §2.2–2.3).

Each vocabulary entry becomes one prompt (paper template ``"a clean origami {}."``), encoded by the CLIP text
tower and L2-normalised. TSE then adds to every foreground class embedding ``t_c`` a softmax-weighted sum of the
attribute bank's cluster centres ``a_k`` (implicit attributes from K-means over LLM-written class descriptions):
``s_c = t_c · A`` → keep the largest ⌈ratio·B⌉-ish logits (the lowest ⌊(1 − ratio)·B⌋ become −∞) →
``w_c = softmax(s_c / τ)`` → ``T_c = normalize(t_c + λ Σ_k w_ck a_k)``. Background prompts are only re-normalised.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TextConfig
from .vocab import Vocabulary, normalize_name

if TYPE_CHECKING:
    from .bank import AttributeBank

_logger = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 32  # vocabularies whose class features a ClassText keeps (least recently used dropped first)


def build_prompts(vocab: Vocabulary, template: str) -> list[str]:
    """One prompt per vocabulary text: foreground prompt names, then background words."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' where the class name goes")
    return [template.format(name) for name in vocab.prompt_texts]


class TextEncoder:
    """CLIP text tower with a per-prompt feature cache (the tower is frozen, so features never change)."""

    def __init__(self, model: torch.nn.Module, tokenizer, identity: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
        """(n, E) float32 unit-norm text features, on the model's device.

        Mirrors the reference's one-template "integral" features: encode, L2-normalise, mean over the single
        template, L2-normalise again.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        device = next(self.model.parameters()).device
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            tokens = self.tokenizer(chunk).to(device)
            feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            feats = F.normalize(feats, dim=-1)
            self._cache.update(zip(chunk, feats))
        return torch.stack([self._cache[p] for p in prompts]) if prompts else torch.zeros(0, 0, device=device)


def enrich(text: Tensor, attributes: Tensor, keep_ratio: float = 0.9, temperature: float = 1.0,
           weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """TSE enrichment of class embeddings.

    Args:
        text: (C, E) unit class embeddings.
        attributes: (B, E) attribute centres.
    Returns:
        (enriched (C, E) unit rows, logits (C, B), weights (C, B) with zeros at the dropped attributes).
    """
    if attributes.shape[1] != text.shape[1]:
        raise ValueError(f"attribute bank dimension {attributes.shape[1]} does not match the text embedding "
                         f"dimension {text.shape[1]}: the bank was built with another CLIP")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    attributes = attributes.to(text)
    logits = text @ attributes.T
    num = attributes.shape[0]
    n_drop = math.floor((1.0 - keep_ratio) * num + 1e-9)
    masked = logits
    if n_drop > 0:
        drop = logits.topk(n_drop, dim=1, largest=False).indices
        masked = logits.scatter(1, drop, float("-inf"))
    weights = torch.softmax(masked / temperature, dim=1)
    enriched = F.normalize(text + weight * (weights @ attributes), dim=-1)
    return enriched, logits, weights


def class_text_features(encoder: TextEncoder, vocab: Vocabulary, cfg: TextConfig,
                        bank: AttributeBank | None = None, enrich_rows: Sequence[bool] | None = None) -> Tensor:
    """(C + M, E) text features of a vocabulary: TSE-enriched foreground rows (when a bank is given), then
    background rows (enriched too with ``cfg.enrich_background``); all unit norm.

    ``enrich_rows`` (length C) restricts enrichment to some foreground classes, e.g. those a knowledge base
    describes; the others keep their plain prompt embedding.
    """
    feats = F.normalize(encoder.encode(build_prompts(vocab, cfg.template)), dim=-1)
    if bank is None:
        return feats
    rows = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    rows[: vocab.num_classes] = True if enrich_rows is None else torch.tensor(list(enrich_rows), dtype=torch.bool)
    rows[vocab.num_classes:] = cfg.enrich_background
    if rows.any():
        enriched, _, _ = enrich(feats[rows], bank.attributes, cfg.keep_ratio, cfg.temperature, cfg.weight)
        feats = feats.clone()
        feats[rows] = enriched
    return feats


class ClassText:
    """The text side of a model: CLIP text tower + optional TSE bank → class features of any vocabulary, cached.

    Args:
        encoder: the CLIP text tower (:class:`TextEncoder`).
        cfg: prompt template and TSE settings.
        bank: attribute bank enriching the classes (``None``: plain prompts).
        knowledge_classes: normalised names a knowledge base describes: only they are enriched (the others keep
            their plain prompts, logged once per vocabulary); ``None``: every class.
        cache_size: vocabularies kept, least recently used dropped first, so a long-running service asked about
            ever new class lists stays bounded (≈ 0.5 MB per VOC-sized entry).
    """

    def __init__(self, encoder: TextEncoder, cfg: TextConfig, bank: AttributeBank | None = None,
                 knowledge_classes: set[str] | None = None, cache_size: int = TEXT_CACHE_SIZE):
        self.encoder, self.cfg, self.bank = encoder, cfg, bank
        self.knowledge_classes = knowledge_classes
        self.cache_size = cache_size
        self._cache: OrderedDict[Vocabulary, Tensor] = OrderedDict()

    def features(self, vocab: Vocabulary) -> Tensor:
        """(C + M, E) (enriched) unit text features of ``vocab``: foreground rows, then background rows."""
        if vocab in self._cache:
            self._cache.move_to_end(vocab)
            return self._cache[vocab]
        rows = None
        if self.knowledge_classes is not None:
            rows = [normalize_name(n) in self.knowledge_classes or normalize_name(p) in self.knowledge_classes
                    for n, p in zip(vocab.names, vocab.prompt_names)]
            plain = [n for n, r in zip(vocab.names, rows) if not r]
            if plain:
                _logger.warning("no descriptions in the knowledge base for %s: plain prompts used", ", ".join(plain))
        feats = class_text_features(self.encoder, vocab, self.cfg, self.bank, rows)
        self._cache[vocab] = feats
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return feats
