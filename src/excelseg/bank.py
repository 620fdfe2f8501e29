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
K-means speed: 1,600 × 512 unit vectors (the COCO knowledge size), B = 224, n_init = 10, on the 2-core CPU of
the development machine (torch 2.14.1, 2 threads): about 0.8 s (0.72–0.81 s, best of 3, in three runs of
``python benchmarks/kmeans_speed.py``). The same script timed scikit-learn 1.9.1 ``KMeans`` (same data, B and
n_init) at 14.1 s against 0.74 s for this implementation in one run (inertia 203.60 vs 203.67): the torch version
is ~19× faster here and keeps scikit-learn out of the dependencies, hence the choice. ``clusters="auto"`` runs one
such K-means per candidate (about a dozen) plus the silhouettes.

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
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PAPER_TEMPLATE
from .text import AttributeBank

if TYPE_CHECKING:
    from .weights import LoadedClip

_logger = logging.getLogger(__name__)

BANK_FORMAT = "excelseg-bank/1"
PAPER_PREFIX = PAPER_TEMPLATE  # "a clean origami {}.", filled in and put before every sentence (reference)
PAPER_CLUSTERS = {"voc": 112, "coco": 224}  # the paper's B for its shipped knowledge bases (EXCEL_SPEC §2.1)
N_INIT = 10  # k-means++ seedings, the best inertia wins (scikit-learn default)
MAX_ITER = 300  # Lloyd iterations per seeding (scikit-learn default)
GRAM_MAX_POINTS = 4096  # up to this many points k-means++ seeding reuses the n×n Gram matrix (128 MiB)
AUTO_CANDIDATES = 12  # number of B values tried by clusters="auto"
AUTO_MAX_PER_CLASS = 8  # auto candidates go up to min(8·C, n/2)


# ------------------------------------------------------------------------------------------------- k-means


@dataclass(frozen=True)
class KMeansResult:
    """``centres`` (k, d) means of the members, ``labels`` (n,) int64 cluster of every point, ``inertia`` the
    sum of squared distances of points to their centre, ``n_iter`` Lloyd iterations of the winning seeding."""

    centres: Tensor
    labels: Tensor
    inertia: float
    n_iter: int


def _sq_dist(x: Tensor, x_sq: Tensor, c: Tensor) -> Tensor:
    """(n, k) squared Euclidean distances, clamped at 0."""
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator, gram: Tensor | None = None) -> Tensor:
    """Greedy k-means++ seeding: each new centre is the best (lowest potential) of 2 + ⌊ln k⌋ candidates drawn
    with probability proportional to the squared distance to the nearest centre chosen so far.

    ``gram`` (n, n) = x xᵀ, when given, replaces the point-to-candidate products (faster for small n).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))

    def dist_to(rows: Tensor) -> Tensor:  # (len(rows), n) squared distances from points ``rows``
        prod = gram[rows] if gram is not None else x[rows] @ x.T
        return (x_sq[rows][:, None] - 2.0 * prod + x_sq[None, :]).clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=gen).item())
    idx = [first]
    closest = dist_to(torch.tensor([first]))[0]
    for _ in range(1, k):
        pot = closest.sum()
        if pot <= 0:  # all remaining points coincide with a centre: take the lowest unused index
            used = set(idx)
            idx.append(next(i for i in range(n) if i not in used))
            continue
        draws = torch.rand(trials, generator=gen, dtype=x.dtype) * pot
        cand = torch.searchsorted(torch.cumsum(closest, 0), draws).clamp_(max=n - 1)
        cand_d = torch.minimum(closest[None, :], dist_to(cand))  # (trials, n)
        best = int(cand_d.sum(1).argmin().item())
        idx.append(int(cand[best].item()))
        closest = cand_d[best]
    return x[torch.tensor(idx)].clone()


def _update(x: Tensor, labels: Tensor, k: int, dist_to_own: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster means; an empty cluster takes the point farthest from its centre (deterministic order)."""
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        labels = labels.clone()
        order = torch.argsort(dist_to_own, descending=True, stable=True)
        taken = 0
        for cluster in empty.tolist():
            while True:  # never strip the last point of a cluster
                point = int(order[taken].item())
                taken += 1
                if counts[labels[point]] > 1:
                    break
            counts[labels[point]] -= 1
            labels[point] = cluster
            counts[cluster] = 1
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums / counts[:, None].to(x.dtype), labels


def _lloyd(x: Tensor, x_sq: Tensor, centres: Tensor, max_iter: int) -> KMeansResult:
    k = centres.shape[0]
    labels: Tensor | None = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        d = _sq_dist(x, x_sq, centres)
        new = d.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres, labels = _update(x, labels, k, d.gather(1, labels[:, None])[:, 0])
    d = _sq_dist(x, x_sq, centres)
    labels = d.argmin(1)
    inertia = float(d.gather(1, labels[:, None]).sum().item())
    return KMeansResult(centres, labels, inertia, n_iter)


def kmeans(x: Tensor, k: int, *, seed: int = 0, n_init: int = N_INIT, max_iter: int = MAX_ITER,
           init: Tensor | None = None) -> KMeansResult:
    """K-means of the rows of ``x`` (n, d) into ``k`` clusters, deterministic for a given ``seed``.

    Greedy k-means++ seeding from one ``torch.Generator(seed)``, ``n_init`` seedings, Lloyd iterations until
    no assignment changes or ``max_iter``; the run with the lowest inertia wins. Empty clusters are re-seeded
    with the point farthest from its centre. Computed in float64 on the CPU; the returned ``centres`` are
    float64. ``init`` (k, d) replaces the k-means++ seeding (one run).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty (n, d) array, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means: the number of clusters must be between 1 and the number of points ({n}), "
                         f"got {k}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"k-means: n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    x = x.detach().to("cpu", torch.float64)
    x_sq = (x * x).sum(1)
    if init is not None:
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"k-means: init must have shape {(k, x.shape[1])}, got {tuple(init.shape)}")
        return _lloyd(x, x_sq, init.detach().to("cpu", torch.float64).clone(), max_iter)
    gen = torch.Generator().manual_seed(int(seed))
    gram = x @ x.T if n <= GRAM_MAX_POINTS else None
    best: KMeansResult | None = None
    for _ in range(n_init):
        result = _lloyd(x, x_sq, _kmeans_pp(x, x_sq, k, gen, gram), max_iter)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------- choosing B


def silhouette_score(x: Tensor, labels: Tensor) -> float:
    """Mean silhouette coefficient of a clustering, on cosine distance ``1 − cos`` (as scikit-learn's
    ``silhouette_score(metric="cosine")``): points alone in their cluster score 0. Needs 2 ≤ k ≤ n − 1."""
    x = F.normalize(x.detach().to("cpu", torch.float64), dim=1)
    n = x.shape[0]
    labels = labels.to("cpu")
    uniq, labels = torch.unique(labels, return_inverse=True)
    k = len(uniq)
    if not 2 <= k <= n - 1:
        raise ValueError(f"the silhouette needs 2 <= clusters <= points - 1, got {k} clusters of {n} points")
    dist = (1.0 - x @ x.T).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    onehot = F.one_hot(labels, k).to(x.dtype)
    sums = dist @ onehot  # (n, k) summed distance of each point to each cluster
    counts = onehot.sum(0)
    own_count = counts[labels]
    a = sums.gather(1, labels[:, None])[:, 0] / (own_count - 1).clamp_min(1)
    other = (sums / counts[None, :]).scatter(1, labels[:, None], float("inf"))
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own_count > 1, s, torch.zeros_like(s))
    return float(s.mean().item())


def auto_candidates(num_classes: int, num_points: int, count: int = AUTO_CANDIDATES) -> list[int]:
    """About ``count`` log-spaced B values from ``max(2, C)`` to ``min(8·C, n/2)`` (both ends included)."""
    low = max(2, num_classes)
    high = min(AUTO_MAX_PER_CLASS * max(num_classes, 1), num_points // 2)
    if high < low:
        high = min(low, num_points - 1)
        low = min(low, high)
    if high < 2:
        raise ValueError(f"clusters='auto' needs at least 3 sentences, got {num_points}")
    if high == low:
        return [low]
    vals = torch.logspace(math.log10(low), math.log10(high), count, dtype=torch.float64).round().long()
    return sorted(set(vals.tolist()) | {low, high})


def select_clusters(x: Tensor, candidates: Sequence[int], *, seed: int = 0,
                    n_init: int = N_INIT) -> tuple[int, dict[int, float]]:
    """The B of ``candidates`` with the highest mean cosine silhouette of its K-means clustering of ``x``.

    Returns ``(best B, {B: score})``; ties go to the smaller B.
    """
    if not candidates:
        raise ValueError("no candidate cluster counts given")
    scores: dict[int, float] = {}
    for k in sorted({int(c) for c in candidates}):
        result = kmeans(x, k, seed=seed, n_init=n_init)
        scores[k] = silhouette_score(x, result.labels)
        _logger.info("clusters=%d: silhouette %.4f", k, scores[k])
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


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

    from .io import atomic_path

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
