"""Building TSE attribute banks from a knowledge base (paper §3.2; EXCEL_SPEC §2.1–2.2).

A *knowledge base* maps each class to a list of short visual descriptions (see :mod:`excelseg.knowledge`).
:func:`build_bank` turns it into an :class:`~excelseg.text.AttributeBank`, the way the reference does:

1. every sentence is lower-cased and, unless ``prefix=None``, preceded by the prompt template applied to its
   class name and a space (reference: ``"a clean origami <class>. <sentence>"``; this prefix makes every
   cluster class-pure, EXCEL_SPEC §10.6 — switch it off to let clusters mix classes);
2. the sentences are encoded with the CLIP text tower and L2-normalised; sentences longer than the tokenizer's
   context (77 tokens) are truncated by the tokenizer and reported in one warning;
3. K-means (:func:`kmeans`: greedy k-means++ seeding, Lloyd iterations until the assignments stop changing or
   300 iterations, best inertia of 10 seedings — scikit-learn's defaults, which the reference used) groups
   them into B clusters. The B *attributes* are the cluster means of the unit embeddings, not re-normalised;
   ``flags[c, k] = 1`` iff a sentence of class c fell into cluster k.

``clusters="auto"`` picks B by the mean silhouette score on cosine distance (:func:`silhouette_score`) over
about a dozen log-spaced candidates between the number of classes and ``min(8·C, n/2)``
(:func:`auto_candidates`); every candidate's score is stored in the bank's metadata.

Everything is deterministic for a given ``seed`` (one ``torch.Generator``, float64 arithmetic on the CPU).
K-means and the choice of B live in :mod:`excelseg.kmeans`.

Banks are saved as safetensors (:func:`save_bank`): ``attributes`` (B, E) float32, ``flags`` (C, B) float32
and string metadata — ``format`` (``excelseg-bank/1``), ``clip_identity`` (the ``LoadedClip.identity`` the
bank was built with), ``knowledge_sha256`` (:func:`knowledge_digest` of the descriptions), ``clusters``,
``seed``, ``prefix`` (the template, ``""`` when off), ``classes`` (JSON list), ``embed_dim`` and, with
``auto``, ``auto_scores`` (JSON ``{B: silhouette}``); also ``clip_name``, ``clusters_requested``,
``sentences`` and ``inertia``. They load with :meth:`AttributeBank.load`.
:func:`check_bank_identity` refuses a bank built with another CLIP; :func:`bank_for` builds a bank once and
caches it under ``<cache>/banks/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PAPER_TEMPLATE
from .kmeans import auto_candidates, kmeans, select_clusters

if TYPE_CHECKING:
    from .weights import LoadedClip

_logger = logging.getLogger(__name__)

BANK_FORMAT = "excelseg-bank/1"
PAPER_PREFIX = PAPER_TEMPLATE  # "a clean origami {}.", filled in and put before every sentence (reference)
PAPER_CLUSTERS = {"voc": 112, "coco": 224}  # the paper's B for its shipped knowledge bases (EXCEL_SPEC §2.1)


# ---------------------------------------------------------------------------------------------- the bank


@dataclass
class AttributeBank:
    """TSE attribute bank: B cluster centres in CLIP text space and the class→cluster membership flags."""

    attributes: Tensor  # (B, E) cluster centres (not re-normalised, as in the reference)
    flags: Tensor | None = None  # (C, B) 0/1: class c has a description in cluster k (unused by enrichment)
    meta: dict = field(default_factory=dict)
    source: str = ""

    @property
    def num_attributes(self) -> int:
        return self.attributes.shape[0]

    @classmethod
    def load(cls, path: str | Path) -> AttributeBank:
        """Load a bank from the reference ``.pth`` (a list ``[centres E×B, flags C×B]``), excelseg's
        ``.safetensors`` (``attributes`` B×E or ``centres`` E×B, optional ``flags``, string metadata) or ``.npz``
        (``centres`` E×B as in the parity kit, or ``attributes`` B×E).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"attribute bank not found: {path}")
        suffix = path.suffix.lower()
        meta: dict = {}
        try:
            if suffix in (".pth", ".pt"):
                obj = torch.load(path, map_location="cpu", weights_only=True)
                if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(torch.is_tensor(t) for t in obj)):
                    raise ValueError("expected the reference format: a list [centres (E, B), flags (C, B)]")
                arrays = {"centres": obj[0], "flags": obj[1]}
            elif suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
                    meta = dict(f.metadata() or {})
            elif suffix == ".npz":
                with np.load(path) as z:
                    arrays = {k: torch.from_numpy(z[k]) for k in z.files}
            else:
                raise ValueError(f"unknown bank format {suffix!r} (use .pth, .safetensors or .npz)")
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            raise ValueError(f"cannot read attribute bank {path}: {exc}") from None
        if "attributes" in arrays:
            attrs = arrays["attributes"]
        elif "centres" in arrays:
            attrs = arrays["centres"].T
        else:
            raise ValueError(f"attribute bank {path} has neither 'attributes' nor 'centres': {sorted(arrays)}")
        if attrs.ndim != 2 or attrs.shape[0] == 0:
            raise ValueError(f"attribute bank {path}: attributes must be a non-empty 2-D array, got {tuple(attrs.shape)}")
        flags = arrays.get("flags")
        return cls(attrs.float().contiguous(), None if flags is None else flags.float(), meta, str(path))


# --------------------------------------------------------------------------------------- text encoding


def knowledge_digest(knowledge: Mapping[str, Sequence[str]]) -> str:
    """sha256 hex of the knowledge content (class order, names and sentences; not the file's formatting)."""
    canon = json.dumps([[str(c), [str(s) for s in knowledge[c]]] for c in knowledge], ensure_ascii=False,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def bank_sentences(knowledge: Mapping[str, Sequence[str]], prefix: str | None = PAPER_PREFIX,
                   ) -> tuple[list[str], list[int]]:
    """The texts that are encoded (lower-cased, prefixed when ``prefix`` is given) and their class indices."""
    if prefix is not None and "{}" not in prefix:
        raise ValueError(f"prefix template {prefix!r} must contain '{{}}' where the class name goes")
    texts: list[str] = []
    owners: list[int] = []
    for c, (name, sentences) in enumerate(knowledge.items()):
        for s in sentences:
            text = s.strip() if prefix is None else f"{prefix.format(name)} {s.strip()}"
            texts.append(text.lower())
            owners.append(c)
    return texts, owners


def _token_counts(tokenizer, texts: Sequence[str]) -> list[int] | None:
    """BPE tokens incl. start/end of each text, or None when the tokenizer cannot tell."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None or not hasattr(tokenizer, "sot_token_id"):
        return None
    try:
        return [len(encode(t)) + 2 for t in texts]
    except Exception:  # noqa: BLE001 (a foreign tokenizer: skip the check rather than fail the build)
        return None


@torch.no_grad()
def encode_sentences(clip: LoadedClip, texts: Sequence[str], *, batch_size: int = 256,
                     progress: bool = True) -> Tensor:
    """(n, E) float32 unit-norm CLIP text embeddings of ``texts`` on the CPU, in batches, with a progress bar
    (shown only on a terminal). Texts longer than the context are truncated; one warning says how many."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = clip.model
    device = next(model.parameters()).device
    context = int(getattr(clip.tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    counts = _token_counts(clip.tokenizer, texts)
    if counts is not None:
        long = [(n, t) for n, t in zip(counts, texts) if n > context]
        if long:
            _logger.warning("%d of %d sentences are longer than the %d-token text context and were truncated "
                            "(longest: %d tokens, e.g. %r)", len(long), len(texts), context,
                            max(n for n, _ in long), long[0][1][:80] + "…")
    else:
        _logger.debug("tokenizer %s cannot count tokens; truncation is not checked", type(clip.tokenizer))
    out = []
    with tqdm(total=len(texts), unit="sent", desc="encoding", disable=None if progress else True) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tokens = clip.tokenizer(chunk).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 0)


def text_embed_dim(clip: LoadedClip) -> int:
    """Dimension of the CLIP's text embeddings."""
    proj = getattr(clip.model, "text_projection", None)
    if isinstance(proj, Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    with torch.no_grad():
        device = next(clip.model.parameters()).device
        return int(clip.model.encode_text(clip.tokenizer(["a"]).to(device)).shape[-1])


# -------------------------------------------------------------------------------------------- building


def validate_build(knowledge: Mapping[str, Sequence[str]], clusters: int | str) -> int:
    """Check a knowledge base and a cluster count before any encoding; returns the number of sentences.

    Raises ValueError for no classes, a class without (non-empty string) descriptions, ``clusters`` that is
    neither ``"auto"`` nor an integer >= 1, or more clusters than sentences.
    """
    if not knowledge:
        raise ValueError("the knowledge base has no classes")
    for name, sentences in knowledge.items():
        listed = list(sentences) if isinstance(sentences, (list, tuple)) else None
        if listed is not None and not listed:
            raise ValueError(f"class {name!r} has no descriptions; every class needs at least one sentence")
        bad = [s for s in listed or [None] if not isinstance(s, str) or not s.strip()]
        if bad:
            raise ValueError(f"class {name!r}: descriptions must be a list of non-empty strings, got "
                             f"{(bad[0] if listed is not None else sentences)!r}")
    n = sum(len(v) for v in knowledge.values())
    if isinstance(clusters, str):
        if clusters != "auto":
            raise ValueError(f"clusters must be a positive integer or 'auto', got {clusters!r}")
        if n < 3:
            raise ValueError(f"clusters='auto' needs at least 3 sentences, got {n}")
        return n
    if int(clusters) != clusters or clusters < 1:
        raise ValueError(f"the number of clusters must be an integer >= 1, got {clusters}")
    if clusters > n:
        raise ValueError(f"cannot make {clusters} clusters from {n} sentences: use at most {n} clusters or "
                         f"add descriptions")
    return n


def build_bank(clip: LoadedClip, knowledge: Mapping[str, Sequence[str]], clusters: int | str, *,
               seed: int = 0, prefix: str | None = PAPER_PREFIX, batch_size: int = 256, progress: bool = True,
               knowledge_sha256: str = "", candidates: Sequence[int] | None = None,
               timings: dict[str, float] | None = None) -> AttributeBank:
    """A TSE attribute bank from class descriptions (see the module docstring for the recipe).

    Args:
        clip: the CLIP whose text tower encodes the sentences (use the one the bank will be used with).
        knowledge: class name → descriptions (:func:`excelseg.knowledge.load_knowledge`); class order = flag
            rows.
        clusters: B, or ``"auto"`` to choose it by silhouette over :func:`auto_candidates` (or
            ``candidates``).
        seed: seeds k-means++ (same seed, same bank).
        prefix: template put, with the class name, before every sentence; ``None``: sentences alone.
        knowledge_sha256: recorded in the metadata; default :func:`knowledge_digest` of ``knowledge``.
        timings: if given, filled with ``encode_s`` and ``cluster_s`` (seconds).
    Returns:
        ``AttributeBank`` with ``attributes`` (B, E) float32, ``flags`` (C, B) float32 and string ``meta``.
    Raises:
        ValueError: B < 1, B larger than the number of sentences, a class without descriptions.
    """
    n = validate_build(knowledge, clusters)
    texts, owners = bank_sentences(knowledge, prefix)
    num_classes = len(knowledge)
    auto = clusters == "auto"
    t0 = time.perf_counter()
    emb = encode_sentences(clip, texts, batch_size=batch_size, progress=progress)
    t_encode = time.perf_counter() - t0
    meta: dict[str, str] = {}
    t0 = time.perf_counter()
    if auto:
        cands = list(candidates) if candidates is not None else auto_candidates(num_classes, n)
        clusters, scores = select_clusters(emb, cands, seed=seed)
        meta["auto_scores"] = json.dumps({str(k): round(v, 6) for k, v in scores.items()})
        _logger.info("clusters=auto chose B=%d (silhouette %.4f) among %s", clusters, scores[clusters],
                     sorted(scores))
    clusters = int(clusters)
    result = kmeans(emb, clusters, seed=seed)
    t_cluster = time.perf_counter() - t0
    flags = torch.zeros(num_classes, clusters)
    flags[torch.tensor(owners), result.labels] = 1.0
    attributes = result.centres.float().contiguous()  # member means of unit vectors, not re-normalised
    meta.update({
        "format": BANK_FORMAT,
        "clip_identity": clip.identity,
        "clip_name": clip.name,
        "knowledge_sha256": knowledge_sha256 or knowledge_digest(knowledge),
        "clusters": str(clusters),
        "clusters_requested": "auto" if auto else str(clusters),
        "seed": str(int(seed)),
        "prefix": prefix or "",
        "classes": json.dumps(list(knowledge), ensure_ascii=False),
        "embed_dim": str(attributes.shape[1]),
        "sentences": str(n),
        "inertia": f"{result.inertia:.6f}",
    })
    _logger.info("bank: %d sentences of %d classes -> %d attributes (encode %.1f s, k-means %.1f s)", n,
                 num_classes, clusters, t_encode, t_cluster)
    if timings is not None:
        timings.update(encode_s=t_encode, cluster_s=t_cluster)
    return AttributeBank(attributes, flags, meta, "")


def save_bank(bank: AttributeBank, path: str | os.PathLike) -> Path:
    """Write ``bank`` as safetensors (``attributes`` (B, E) and ``flags`` (C, B) float32, string metadata),
    atomically. Returns the path."""
    from safetensors.torch import save_file

    from .io.files import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"banks are saved as .safetensors, got {path.name!r}")
    tensors = {"attributes": bank.attributes.detach().to("cpu", torch.float32).contiguous()}
    if bank.flags is not None:
        tensors["flags"] = bank.flags.detach().to("cpu", torch.float32).contiguous()
    meta = {str(k): str(v) for k, v in bank.meta.items()}
    meta.setdefault("format", BANK_FORMAT)
    meta.setdefault("clusters", str(bank.attributes.shape[0]))
    meta.setdefault("embed_dim", str(bank.attributes.shape[1]))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def check_bank_identity(bank: AttributeBank, clip: LoadedClip) -> None:
    """Refuse a bank built with another CLIP (metadata ``clip_identity``) or of another embedding dimension.

    Banks without a recorded identity (the reference ``.pth``, imported banks) are accepted with an info log.
    """
    where = bank.source or "in use"
    built = str(bank.meta.get("clip_identity", "") or "")
    if built and built != clip.identity:
        raise ValueError(f"attribute bank {where} was built with CLIP {built}, but the CLIP in use is "
                         f"{clip.identity}; rebuild it with `excelseg bank build --knowledge ... --clip ...`")
    dim = text_embed_dim(clip)
    if bank.attributes.shape[1] != dim:
        raise ValueError(f"attribute bank {where} holds {bank.attributes.shape[1]}-d attributes but the CLIP "
                         f"in use ({clip.name}) has {dim}-d text embeddings; rebuild it with "
                         f"`excelseg bank build --knowledge ... --clip ...`")
    if not built:
        _logger.info("attribute bank %s records no CLIP identity; assuming it matches %s", where,
                     clip.identity)


def bank_cache_key(clip_identity: str, knowledge_sha256: str, clusters: int | str, seed: int,
                   prefix: str | None) -> str:
    """Hex key of a cached bank: hash of the format, CLIP identity, knowledge digest, B, seed and prefix."""
    parts = [BANK_FORMAT, clip_identity, knowledge_sha256, str(clusters), str(int(seed)),
             "<none>" if prefix is None else prefix]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]


def bank_for(clip: LoadedClip, knowledge: str | os.PathLike | Mapping[str, Sequence[str]],
             clusters: int | str, seed: int = 0, prefix: str | None = PAPER_PREFIX,
             cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> AttributeBank:
    """The bank for these settings from ``<cache>/banks/<key>.safetensors``, built and saved on first use.

    ``knowledge`` is ``"voc"``, ``"coco"``, a knowledge JSON path or an already loaded dict. ``cache_dir``
    defaults to :func:`excelseg.weights.default_cache_dir`.
    """
    from .knowledge import load_knowledge
    from .weights import default_cache_dir

    kb = dict(knowledge) if isinstance(knowledge, Mapping) else load_knowledge(knowledge)
    digest = knowledge_digest(kb)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "banks" / f"{bank_cache_key(clip.identity, digest, clusters, seed, prefix)}.safetensors"
    if path.is_file():
        try:
            bank = AttributeBank.load(path)
        except ValueError as exc:
            _logger.warning("cached bank %s is unreadable (%s); rebuilding it", path, exc)
        else:
            check_bank_identity(bank, clip)
            _logger.info("loaded cached attribute bank %s", path)
            return bank
    bank = build_bank(clip, kb, clusters, seed=seed, prefix=prefix, progress=progress,
                      knowledge_sha256=digest)
    save_bank(bank, path)
    _logger.info("cached attribute bank at %s", path)
    bank.source = str(path)
    return bank
