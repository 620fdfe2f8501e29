"""Tiny random open_clip CLIPs for fast CPU tests (any width / depth / patch size)."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from excelseg.weights import LoadedClip


def tiny_model(seed: int = 0, *, width: int = 64, layers: int = 4, patch: int = 8, image: int = 32,
               heads: int = 2, embed: int = 32) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(embed_dim=embed,
                 vision_cfg=CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image,
                                          head_width=width // heads),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
                 quick_gelu=True)
    # random init leaves attention nearly uniform; sharpen it so SVC and refinement have structure to act on
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(4.0)
    return model.eval().requires_grad_(False)


def save_tiny(path: Path, seed: int = 0, **kw) -> Path:
    torch.save(tiny_model(seed, **kw).state_dict(), path)
    return path


def tiny_clip(seed: int = 0, **kw) -> LoadedClip:
    import open_clip

    return LoadedClip(model=tiny_model(seed, **kw), tokenizer=open_clip.get_tokenizer("ViT-B-16"), name="tiny",
                      identity=f"tiny:{seed}", source="test", mean=(0.5,) * 3, std=(0.5,) * 3)
