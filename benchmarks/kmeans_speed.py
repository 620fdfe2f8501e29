"""Speed of excelseg's torch K-means on a bank-sized problem, and of scikit-learn's when it is installed.

    python benchmarks/kmeans_speed.py [--points 1600] [--dim 512] [--clusters 224] [--threads 2] [--repeat 3]

Default sizes are the COCO knowledge base (80 classes × 20 sentences, 512-d CLIP ViT-B/16 text embeddings) and
the paper's B = 224. Points are synthetic unit vectors with the similarity structure of class-prefixed
sentence embeddings (see ``data``). Both run k-means++ with 10 seedings and at most 300 Lloyd iterations.
Prints the best wall time of ``--repeat`` runs and the inertia of each implementation.
"""

from __future__ import annotations

import argparse
import time

import torch

from excelseg.kmeans import kmeans


def data(n: int, dim: int, groups: int, seed: int = 0, rank: int = 32) -> torch.Tensor:
    """Unit vectors shaped like CLIP sentence embeddings: a shared direction plus ``groups`` class clusters
    in a ``rank``-dimensional subspace (mean cosine about 0.85 within a group, 0.68 across groups)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(rank, dim, generator=g)
    z = torch.randn(groups, rank, generator=g)[torch.arange(n) % groups] + torch.randn(n, rank, generator=g)
    shared = 2.0 * rank ** 0.5 * torch.randn(1, dim, generator=g)
    return torch.nn.functional.normalize(z @ proj + shared, dim=1)


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=1600)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=224)
    ap.add_argument("--groups", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = data(args.points, args.dim, args.groups)
    print(f"{args.points} x {args.dim} points, B = {args.clusters}, n_init = 10, {args.threads} threads, "
          f"torch {torch.__version__}")
    t, res = best_time(lambda: kmeans(x, args.clusters, seed=0), args.repeat)
    print(f"excelseg.bank.kmeans: {t:.2f} s (inertia {res.inertia:.3f}, {res.n_iter} iterations)")
    try:
        import numpy as np
        from sklearn import __version__ as skv
        from sklearn.cluster import KMeans
    except ImportError:
        print("scikit-learn: not installed (skipped)")
        return
    xn = x.double().numpy()
    t, km = best_time(lambda: KMeans(n_clusters=args.clusters, random_state=0, n_init=10).fit(xn),
                      args.repeat)
    print(f"sklearn {skv} KMeans: {t:.2f} s (inertia {float(np.asarray(km.inertia_)):.3f}, "
          f"{km.n_iter_} iterations)")


if __name__ == "__main__":
    main()
