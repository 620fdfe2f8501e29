"""Access to the shared parity kit (``../shared/parity``): paths, the regenerated random ViT-B/16, images."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "parity"
GOLDEN = PARITY / "golden"
VOC_SAMPLE = SHARED / "data" / "voc_sample"
REF_BANK = PARITY / "pascal_voc_desc_clip_ViT-B-16_gpt4.0_cluster_112_embedding_bank.pth"
CONTENT_SHA256 = "128cb3feed3bc0f789bdf640885edcb96d85a70f4cc23d1e4044c8b39d423b57"
DETAIL_IMAGES = ("2007_001763", "2009_000573")


def require_kit() -> None:
    if not (GOLDEN / "run_meta.json").is_file():
        pytest.skip(f"parity kit not found at {PARITY} (only present next to the project's shared/ folder)")
    if not (VOC_SAMPLE / "manifest.json").is_file():
        pytest.skip(f"VOC sample images not found at {VOC_SAMPLE}")


def _make_random_clip_module():
    spec = importlib.util.spec_from_file_location("make_random_clip", PARITY / "make_random_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def random_clip_weights() -> Path:
    """The kit's seed-0 random ViT-B/16 state dict, regenerated once and cached outside the repository."""
    cache = Path(os.environ.get("EXCELSEG_PARITY_CACHE", Path.home() / ".cache" / "excelseg" / "parity"))
    path = cache / "clip_rand_seed0.pt"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"clip_rand_seed0.pt.{os.getpid()}.tmp"  # test workers may regenerate it concurrently
        subprocess.run([sys.executable, str(PARITY / "make_random_clip.py"), "--seed", "0", "--out", str(tmp)],
                       check=True, capture_output=True)
        os.replace(tmp, path)
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    got = _make_random_clip_module().content_sha256(sd)
    if got != CONTENT_SHA256:
        path.unlink()
        raise AssertionError(f"regenerated parity weights have content sha256 {got}, expected {CONTENT_SHA256}")
    return path


@lru_cache(maxsize=1)
def run_meta() -> dict:
    return json.loads((GOLDEN / "run_meta.json").read_text())


def image_names() -> list[str]:
    if not (GOLDEN / "run_meta.json").is_file():
        return []
    return [im["name"] for im in run_meta()["images"]]


@lru_cache(maxsize=1)
def manifest_entries() -> dict:
    manifest = json.loads((VOC_SAMPLE / "manifest.json").read_text())
    return {name: entry for group in manifest.values() for name, entry in group.items()}


def image_path(name: str) -> Path:
    return VOC_SAMPLE / manifest_entries()[name]["image"]


def gt_mask(name: str) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(VOC_SAMPLE / manifest_entries()[name]["mask"]))


def golden(name: str) -> dict:
    with np.load(GOLDEN / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
