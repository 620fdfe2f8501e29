"""The trainable heads of ExCEL: the LVC adapter and the segmentation decoder (EXCEL_SPEC §4.1, §5.1).

* :class:`LvcAdapter` — Learnable Visual Calibration adapter. One two-layer MLP per CLIP layer
  (``768 → 256 → ReLU → 256``) applied to that layer's patch tokens, the 12 results concatenated on the channel
  axis (12·256 = 3072, layer 0 first), fused by a 1×1 convolution to 256 channels, then ``Dropout2d(0.1)``.
  Output ``F_a`` (B, 256, h, w). No normalisation layers. 3,938,560 parameters for ViT-B/16.
* :class:`SegDecoder` — three pre-LayerNorm transformer blocks (width 256, 8 heads, MLP 256 → 1024 → 256 with
  QuickGELU, no positional embedding, no dropout) over the ``h·w`` tokens of ``F_a``, then a 1×1 convolution to
  ``C + 1`` logits. 2,374,677 parameters for VOC (21 outputs).
* :class:`ExcelHeads` — both, i.e. everything ExCEL trains (6,313,237 parameters for VOC).

Parameter names are excelseg's own; :data:`REFERENCE_KEY_MAP` / :func:`reference_key_map` spell out, key by key,
which tensor of the reference implementation's state dict (``decoder_fts_fuse.*`` = adapter, ``decoder.*`` =
decoder) each one is, so a reference checkpoint converts by an explicit map with shape checks
(:mod:`excelseg.interop`).

Initialisation follows PyTorch's defaults for the same layer types (what the reference gets): ``nn.Linear`` /
``nn.Conv2d`` defaults, LayerNorm ones/zeros, attention ``in_proj`` Xavier-uniform with zero biases (as
``nn.MultiheadAttention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ExcelHeads", "LvcAdapter", "SegDecoder", "reference_key_map"]


class _LayerMlp(nn.Module):
    """Per-layer MLP of the adapter: (…, in_dim) → (…, dim); ``fc2(relu(fc1(x)))``."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class LvcAdapter(nn.Module):
    """LVC adapter (EXCEL_SPEC §4.1).

    Args:
        num_layers: number of CLIP layers whose tokens come in (12 for ViT-B/16).
        in_dim: CLIP width D (768).
        dim: adapter width (256).
        dropout: ``Dropout2d`` probability after the fuse convolution (0.1).
    """

    def __init__(self, num_layers: int = 12, in_dim: int = 768, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.num_layers, self.in_dim, self.dim = num_layers, in_dim, dim
        self.mlps = nn.ModuleList(_LayerMlp(in_dim, dim) for _ in range(num_layers))
        self.fuse = nn.Conv2d(num_layers * dim, dim, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L, D, h, w) per-layer patch tokens → (B, dim, h, w) adapter features ``F_a``."""
        if tokens.dim() != 5 or tokens.shape[1] != self.num_layers or tokens.shape[2] != self.in_dim:
            raise ValueError(f"tokens must be (B, {self.num_layers}, {self.in_dim}, h, w), got {tuple(tokens.shape)}")
        b, n_layers, _, h, w = tokens.shape
        x = tokens.flatten(3).transpose(2, 3)  # (B, L, N, D)
        per_layer = [mlp(x[:, i]) for i, mlp in enumerate(self.mlps)]  # L × (B, N, dim)
        cat = torch.cat(per_layer, dim=-1).transpose(1, 2).reshape(b, n_layers * self.dim, h, w)
        return self.dropout(self.fuse(cat))


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout (packed q/k/v projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, dim) → (B, N, dim); softmax(q kᵀ / √d_head) v per head."""
        b, n, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class _DecoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1 x)``, then ``x + mlp(ln_2 x)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(dim, dim * mlp_ratio))
        self.mlp.add_module("act", _QuickGELU())
        self.mlp.add_module("proj", nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class SegDecoder(nn.Module):
    """Transformer segmentation decoder (EXCEL_SPEC §5.1).

    Args:
        num_outputs: logits per pixel, C + 1 (21 for VOC, 81 for COCO).
        dim: token width (256), heads (8), depth (3), mlp_ratio (4).
    """

    def __init__(self, num_outputs: int, dim: int = 256, heads: int = 8, depth: int = 3, mlp_ratio: int = 4):
        super().__init__()
        self.num_outputs, self.dim = num_outputs, dim
        self.blocks = nn.ModuleList(_DecoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.classifier = nn.Conv2d(dim, num_outputs, kernel_size=1)

    def forward(self, fts: Tensor) -> Tensor:
        """(B, dim, h, w) adapter features → (B, num_outputs, h, w) logits at the patch grid (1/16 input)."""
        b, d, h, w = fts.shape
        x = fts.flatten(2).transpose(1, 2)  # (B, N, dim), row-major tokens
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.transpose(1, 2).reshape(b, d, h, w))


class ExcelHeads(nn.Module):
    """Everything ExCEL trains: ``adapter`` (LVC, §4.1) and ``decoder`` (§5.1).

    Args:
        num_outputs: decoder outputs C + 1.
        num_layers, in_dim: CLIP depth and width whose per-layer tokens feed the adapter (12, 768).
        dim: adapter / decoder width (256).
        dropout: adapter ``Dropout2d`` probability (0.1).
    """

    def __init__(self, num_outputs: int = 21, num_layers: int = 12, in_dim: int = 768, dim: int = 256,
                 heads: int = 8, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        self.adapter = LvcAdapter(num_layers, in_dim, dim, dropout)
        self.decoder = SegDecoder(num_outputs, dim, heads, depth)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, D, h, w) tokens → adapter features (B, dim, h, w) and logits (B, C+1, h, w)."""
        fts = self.adapter(tokens)
        return fts, self.decoder(fts)


def reference_key_map(num_layers: int = 12, depth: int = 3) -> dict[str, str]:
    """Reference state-dict key → excelseg :class:`ExcelHeads` key, for every trainable tensor (88 for ViT-B/16).

    Reference names (``model/segformer_head.py``, ``model/decoder/TransDecoder.py``; parity README §3.1):
    ``decoder_fts_fuse.linears_modulelist.{l}.proj{,_2}``, ``decoder_fts_fuse.linear_fuse``,
    ``decoder.transformer.resblocks.{i}.{attn.in_proj_*, attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2}``,
    ``decoder.linear_pred``. The layouts are identical, so every tensor maps unchanged (shapes are checked by
    the importer).
    """
    m: dict[str, str] = {}
    for p in ("weight", "bias"):
        for layer in range(num_layers):
            m[f"decoder_fts_fuse.linears_modulelist.{layer}.proj.{p}"] = f"adapter.mlps.{layer}.fc1.{p}"
            m[f"decoder_fts_fuse.linears_modulelist.{layer}.proj_2.{p}"] = f"adapter.mlps.{layer}.fc2.{p}"
        m[f"decoder_fts_fuse.linear_fuse.{p}"] = f"adapter.fuse.{p}"
        for i in range(depth):
            ref, ours = f"decoder.transformer.resblocks.{i}", f"decoder.blocks.{i}"
            m[f"{ref}.attn.in_proj_{p}"] = f"{ours}.attn.in_proj_{p}"
            m[f"{ref}.attn.out_proj.{p}"] = f"{ours}.attn.out_proj.{p}"
            m[f"{ref}.ln_1.{p}"] = f"{ours}.ln_1.{p}"
            m[f"{ref}.ln_2.{p}"] = f"{ours}.ln_2.{p}"
            m[f"{ref}.mlp.c_fc.{p}"] = f"{ours}.mlp.fc.{p}"
            m[f"{ref}.mlp.c_proj.{p}"] = f"{ours}.mlp.proj.{p}"
        m[f"decoder.linear_pred.{p}"] = f"decoder.classifier.{p}"
    return m


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(math.prod(p.shape) for p in module.parameters())
