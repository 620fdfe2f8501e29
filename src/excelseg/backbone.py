"""CLIP dense forward with Static Visual Calibration (paper §3.3; EXCEL_SPEC §1, §1.1, §3.1).

:class:`DenseEncoder` runs an open_clip ``VisionTransformer`` block by block with the module's own frozen
weights and returns what ExCEL needs from one pass:

* every block's output tokens of the ordinary ("original") stream;
* the head-averaged attention softmax(q kᵀ) of the blocks asked for (refinement affinity, EXCEL_SPEC §3.3);
* the SVC-calibrated features: from the first calibrated block on, a second residual stream starts from that
  block's input and receives, in each calibrated block, ``W_o · (A_svc · V) + b_o`` (no LayerNorm, no MLP on that
  stream), where q/k/v come from ``ln_1`` of the *original* stream and ``A_svc`` is the intra-correlation map of
  :mod:`excelseg.calibration`. Its CLS token is replaced by the original stream's final CLS token, then
  ``ln_post`` and the projection are applied to every token (the CLIP-Surgery dual path).

``attention`` picks what ``features`` are: ``"svc"`` (the calibrated stream above; with no calibrated blocks,
plain CLIP tokens) or the last-block attention of a training-free peer (``maskclip``, ``sclip``, ``clearclip``,
``naclip``, ``none`` = plain CLIP; :data:`excelseg.calibration.LAST_BLOCK_ATTENTION`): the last block is run a
second time, on the same input, with that mode's attention (and without its residual and FFN where the mode drops
them); the CLS token of ``features`` is the original stream's, as for SVC. The original stream, the attention maps
and the tokens do not depend on ``attention``.

The positional embedding is interpolated bilinearly (align_corners=False) to the input's patch grid on the fly
and cached per grid; the stored parameter is never modified. With ``pos_via_grid`` the interpolation goes through
an intermediate grid first, as the reference does (it resizes 14×14 → 20×20 once at construction, then to any
other grid per forward). ``pos_interp="bicubic"`` is the peers' interpolation instead: bicubic (A = −0.75),
align_corners=False, with the scale factor ``(g + 0.1) / g0`` used in the coordinate map (not ``g / g0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _native as native
from .calibration import KEEPS_RESIDUAL, LAST_BLOCK_ATTENTION, head_chunks, intra_correlation, mode_attention
from .weights import check_supported


@dataclass
class DenseOutput:
    """Outputs of one dense forward; T = N + 1 tokens (index 0 = CLS), N = grid[0] · grid[1] patches, row-major."""

    features: Tensor  # (B, T, E) SVC-calibrated (or ``attention``-mode) tokens after ln_post and projection
    svc_stream: Tensor  # (B, T, D) the stream ``features`` come from, before ln_post (CLS from the original stream)
    tokens: list[Tensor]  # L × (B, T, D) block outputs of the original stream
    attn: Tensor  # (B, len(attn_blocks), T, T) head-averaged softmax(q kᵀ) attention
    attn_blocks: tuple[int, ...]  # block index of each attn map
    svc_blocks: tuple[int, ...]  # calibrated block indices
    grid: tuple[int, int]  # (h, w) patch grid
    pooled: Tensor  # (B, E) ordinary CLIP image embedding (= open_clip encode_image)
    cache: SvcCache | None = None  # stage (a) cache for re-running the SVC dual path (``keep_cache=True``)
    attention: str = "svc"  # what ``features`` are: SVC (or plain without svc_blocks) or a last-block mode

    def layer_tokens(self) -> Tensor:
        """(B, L, D, h, w) patch tokens of every block (the LVC adapter's input, EXCEL_SPEC §4.1)."""
        if not self.tokens:
            raise ValueError("this forward kept no tokens (return_tokens=False)")
        t = torch.stack([tok[:, 1:] for tok in self.tokens], dim=1)  # (B, L, N, D)
        return t.transpose(2, 3).reshape(t.shape[0], t.shape[1], t.shape[3], *self.grid)


@dataclass
class SvcCache:
    """What the SVC dual path needs, kept by one frozen forward (DESIGN "Training architecture", stage (a)).

    The original stream, and so every calibrated block's ln_1 q/k/v, does not depend on the LVC shift ``E``;
    the cache therefore holds, per calibrated block, the static head-reduced intra-correlation map (a function
    of that block's ln_1 q/k/v) and the merged values v, so :meth:`DenseEncoder.calibrate` re-runs only the
    calibrated stream (no softmax, no second CLIP forward).
    """

    start: Tensor  # (B, T, D) input of the first calibrated block (= start of the calibrated stream)
    maps: list[Tensor]  # per calibrated block: (B, T, T) static SVC map, head-summed (or -averaged)
    values: list[Tensor]  # per calibrated block: (B, T, D) merged values of ln_1(x_ori)
    blocks: tuple[int, ...]  # calibrated block indices
    cls: Tensor  # (B, 1, D) final CLS token of the original stream
    shift_scale: float  # how a per-head shift enters the reduced map: H (head sum) or 1 (head mean)
    attention: str = "svc"  # a last-block mode: ``start`` is the last block's input, maps/values are empty
    grid: tuple[int, int] | None = None  # (h, w) patch grid (NACLIP's neighbourhood)

    def select(self, index: slice | Tensor | list[int]) -> SvcCache:
        """The cache of some images of the batch (the dual path is per image; only ``E`` couples a batch)."""
        return SvcCache(self.start[index], [m[index] for m in self.maps], [v[index] for v in self.values],
                        self.blocks, self.cls[index], self.shift_scale, self.attention, self.grid)


def interpolate_pos_embed(pos: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """Resize a (1 + h·w, D) positional embedding from ``src_grid`` to ``dst_grid``; the CLS row is kept."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    cls_row, patch = pos[:1], pos[1:]
    d = patch.shape[-1]
    patch = patch.reshape(1, src_grid[0], src_grid[1], d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return torch.cat([cls_row, patch.permute(0, 2, 3, 1).reshape(-1, d)], dim=0)


def interpolate_pos_embed_bicubic(pos: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """The training-free peers' resize (parity attention_modes README §4): bicubic, align_corners=False, scale
    factor ``(g + 0.1) / g0`` per axis in the coordinate map; the CLS row is kept; none when the grids agree."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    cls_row, patch = pos[:1], pos[1:]
    d = patch.shape[-1]
    patch = patch.reshape(1, src_grid[0], src_grid[1], d).permute(0, 3, 1, 2)
    factor = ((dst_grid[0] + 0.1) / src_grid[0], (dst_grid[1] + 0.1) / src_grid[1])
    patch = F.interpolate(patch, scale_factor=factor, mode="bicubic", align_corners=False,
                          recompute_scale_factor=False)
    if tuple(patch.shape[-2:]) != tuple(dst_grid):
        raise ValueError(f"bicubic positional embedding gave {tuple(patch.shape[-2:])}, expected {tuple(dst_grid)}")
    return torch.cat([cls_row, patch.permute(0, 2, 3, 1).reshape(-1, d)], dim=0)


class DenseEncoder(nn.Module):
    """Dense, SVC-calibrated forward of a frozen open_clip ViT image tower (no parameters of its own)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        check_supported(visual)
        self.visual = visual
        self.patch_size = tuple(visual.patch_size)
        self.base_grid = tuple(visual.grid_size)
        self.num_blocks = len(visual.transformer.resblocks)
        self.num_heads = visual.transformer.resblocks[0].attn.num_heads
        self._pos_cache: dict[tuple, Tensor] = {}

    def last_blocks(self, n: int) -> tuple[int, ...]:
        """Indices of the last ``n`` blocks (paper: n = 5 → 7…11 for a 12-block ViT)."""
        if not 0 <= n <= self.num_blocks:
            raise ValueError(f"cannot calibrate the last {n} blocks of a {self.num_blocks}-block ViT")
        return tuple(range(self.num_blocks - n, self.num_blocks))

    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        return (size[0] // self.patch_size[0], size[1] // self.patch_size[1])

    def pos_embed(self, grid: tuple[int, int], via: tuple[int, int] | None = None,
                  interp: str = "bilinear") -> Tensor:
        pos = self.visual.positional_embedding
        key = (grid, via, interp, pos.device, pos.dtype, pos._version)
        if key not in self._pos_cache:
            if interp == "bicubic":
                if via is not None:
                    raise ValueError("pos_via_grid applies to the bilinear interpolation only")
                self._pos_cache = {key: interpolate_pos_embed_bicubic(pos, self.base_grid, grid).detach()}
                return self._pos_cache[key]
            if interp != "bilinear":
                raise ValueError(f"pos_interp must be 'bilinear' or 'bicubic', got {interp!r}")
            src = self.base_grid
            if via is not None:
                pos, src = interpolate_pos_embed(pos, src, via), via
            self._pos_cache = {key: interpolate_pos_embed(pos, src, grid).detach()}
        return self._pos_cache[key]

    def _qkv(self, block: nn.Module, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = y.shape
        attn = block.attn
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    @staticmethod
    def _attention_with_map(q: Tensor, k: Tensor, v: Tensor, scale: float, rows: int) -> tuple[Tensor, Tensor]:
        """softmax(q kᵀ) attention output for the first ``rows`` queries, (B, H, rows, d), and the head-mean
        map (B, T, T). Float32 CPU tensors go to the native kernels (``_native/attention.c``: no per-head map in
        memory); otherwise the maps are built a few heads at a time (:data:`excelseg.calibration.CHUNK_ELEMENTS`)."""
        b, h, t, _ = q.shape
        lib = native.attention_library_for(q)
        if lib is not None:  # fused C kernels: no per-head T×T map in memory
            out, maps = native.attention_cpu(q, k, v, scale, rows, lib)
            return out, maps.div_(h)
        out = q.new_empty(b, h, rows, v.shape[-1])
        mean = q.new_zeros(b, t, t)
        for i, hs in head_chunks(b, h, t):
            a = torch.softmax(torch.matmul(q[i, hs], k[i, hs].transpose(-1, -2)).mul_(scale), dim=-1)
            mean[i] += a.sum(dim=0)
            out[i, hs] = torch.matmul(a[:, :rows], v[i, hs])
        return out, mean.div_(h)

    @staticmethod
    def _merge(z: Tensor) -> Tensor:
        b, h, t, dh = z.shape
        return z.transpose(1, 2).reshape(b, t, h * dh)

    @torch.no_grad()
    def forward(
        self,
        x: Tensor,
        svc_blocks: Sequence[int] = (),
        attn_blocks: Sequence[int] = (),
        *,
        head_sum: bool = True,
        attention: str = "svc",
        pos_via_grid: tuple[int, int] | None = None,
        pos_interp: str = "bilinear",
        return_tokens: bool = True,
        keep_cache: bool = False,
        alias_tokens: bool = False,
    ) -> DenseOutput:
        """Dense forward.

        Args:
            x: (B, 3, H, W) normalised images; H, W are cropped to multiples of the patch size by the conv.
            svc_blocks: block indices to calibrate; must be a contiguous run ending at the last block
                (the dual path starts at the first one). Empty: ``features`` are plain CLIP tokens.
            attn_blocks: block indices whose head-averaged attention maps are returned.
            head_sum: SVC map summed over heads (reference) instead of averaged.
            attention: ``"svc"`` (features = the SVC stream of ``svc_blocks``) or a last-block mode of
                :data:`~excelseg.calibration.LAST_BLOCK_ATTENTION` (features = that mode's last block; ``svc_blocks``
                then only feed ``alias_tokens``, and ``keep_cache`` keeps the mode's cache).
            pos_via_grid: intermediate grid for positional-embedding interpolation (reference quirk).
            pos_interp: ``"bilinear"`` (ExCEL) or ``"bicubic"`` (the peers' scale-factor resize).
            return_tokens: keep every block's tokens. False skips them and, in the last block, computes the
                original stream's attention output and MLP for the CLS token only when SVC or a mode other than
                ``none`` is on (all that the features and the pooled embedding need; ~5% of a ViT-B/16 forward);
                ``tokens`` is then empty.
            keep_cache: also return the :class:`SvcCache` that :meth:`calibrate` re-runs the dual path from.
            alias_tokens: return ``tokens`` as the reference's in-place aliasing leaves them (EXCEL_SPEC §10.1,
                parity README §5.4): the slot of the block before the first calibrated one holds the final
                calibrated stream (CLS replaced), and the slot of every calibrated block but the last holds
                ``x_l + attn_{l+1}(ln_1 x_l)`` (the next block's attention residual, before its MLP).
        """
        vis = self.visual
        if attention != "svc" and attention not in LAST_BLOCK_ATTENTION:
            raise ValueError(f"attention must be 'svc' or one of {', '.join(LAST_BLOCK_ATTENTION)}, got {attention!r}")
        mode = None if attention == "svc" else attention
        rerun = mode not in (None, "none")  # the last block runs a second time with the mode's attention
        svc = tuple(sorted(svc_blocks))
        if svc and svc != tuple(range(svc[0], self.num_blocks)):
            raise ValueError(f"svc_blocks must be the last blocks in order, got {svc}")
        want_attn = set(attn_blocks)
        bad = [i for i in want_attn | set(svc) if not 0 <= i < self.num_blocks]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {self.num_blocks}-block ViT")

        weight = vis.conv1.weight
        x = x.to(device=weight.device, dtype=weight.dtype)
        feat = vis.conv1(x)
        grid = (feat.shape[-2], feat.shape[-1])
        feat = feat.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(feat.dtype).expand(feat.shape[0], 1, -1)
        h = torch.cat([cls, feat], dim=1) + self.pos_embed(grid, pos_via_grid, pos_interp).to(feat.dtype)
        h = vis.ln_pre(h)

        scale = (h.shape[-1] // self.num_heads) ** -0.5
        tokens: list[Tensor] = []
        attn_maps: list[Tensor] = []
        mids: dict[int, Tensor] = {}  # block index → stream after its attention residual (for alias_tokens)
        start, maps, values = None, [], []
        stream = mode_stream = mode_start = None
        last = self.num_blocks - 1
        svc_features = attention == "svc" and bool(svc)
        for i, block in enumerate(vis.transformer.resblocks):
            # features need the original stream's last tokens only for plain CLIP (no SVC, mode none)
            cls_only = i == last and not return_tokens and (svc_features or attention not in ("svc", "none"))
            if mode is not None and i == last:
                mode_start = h
            # every block through its own q, k, v: plain blocks too use F.scaled_dot_product_attention's fused
            # kernels instead of nn.MultiheadAttention's, which hold the B×H×T×T map (1024 px: peak memory +309 MB
            # instead of +930 MB; benchmarks/dense_forward.py)
            q, k, v = self._qkv(block, block.ln_1(h))
            if rerun and i == last:
                mode_stream = self._mode_block(block, h, q, k, v, mode, grid, scale)
            if i in want_attn:
                o, a_mean = self._attention_with_map(q, k, v, scale, 1 if cls_only else q.shape[2])
                attn_maps.append(a_mean)
            else:
                o = F.scaled_dot_product_attention(q[:, :, :1] if cls_only else q, k, v)
            if svc and i >= svc[0]:
                if stream is None:
                    stream = start = h
                a_svc = intra_correlation(q, k, v, scale, head_sum=head_sum)
                v_merged = self._merge(v)
                stream = self._svc_step(block, stream, a_svc, v_merged)
                if keep_cache and attention == "svc":
                    maps.append(a_svc)
                    values.append(v_merged)
            if cls_only:
                h = h[:, :1]
            h = h + block.ls_1(F.linear(self._merge(o), block.attn.out_proj.weight, block.attn.out_proj.bias))
            if alias_tokens:
                mids[i] = h
            h = h + block.ls_2(block.mlp(block.ln_2(h)))
            if return_tokens:
                tokens.append(h)

        if stream is None:
            stream = h
        stream = torch.cat([h[:, :1], stream[:, 1:]], dim=1)
        if mode is None:
            calibrated = stream
        elif mode == "none":
            calibrated = h
        else:
            calibrated = torch.cat([h[:, :1], mode_stream[:, 1:]], dim=1)
        features = vis.ln_post(calibrated) @ vis.proj
        pooled = vis.ln_post(h[:, 0]) @ vis.proj
        b = x.shape[0]
        t = calibrated.shape[1]
        attn = torch.stack(attn_maps, dim=1) if attn_maps else h.new_zeros(b, 0, t, t)
        if alias_tokens and svc and tokens:
            if svc[0] > 0:
                tokens[svc[0] - 1] = stream
            for i in svc[:-1]:
                tokens[i] = mids[i + 1]
        cache = None
        if keep_cache and attention != "svc":
            cache = SvcCache(mode_start, [], [], (last,), h[:, :1], 1.0, attention, grid)
        elif keep_cache and svc:
            cache = SvcCache(start, maps, values, svc, h[:, :1], float(self.num_heads) if head_sum else 1.0)
        return DenseOutput(features, calibrated, tokens, attn, tuple(sorted(want_attn)), svc, grid, pooled, cache,
                           attention)

    def _mode_block(self, block: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mode: str,
                    grid: tuple[int, int], scale: float, shift: Tensor | None = None) -> Tensor:
        """The last block with a peer's attention (:func:`excelseg.calibration.mode_attention`) on input ``x``
        (B, T, D): ``x + o`` then ``+ MLP(ln_2 ·)`` where the mode keeps them, else ``o`` alone."""
        o = self._merge(mode_attention(mode, q, k, v, scale, grid, shift))
        o = F.linear(o, block.attn.out_proj.weight, block.attn.out_proj.bias)
        if not KEEPS_RESIDUAL[mode]:
            return o
        z = x + block.ls_1(o)
        return z + block.ls_2(block.mlp(block.ln_2(z)))

    def _svc_step(self, block: nn.Module, stream: Tensor, a_svc: Tensor, v: Tensor,
                  shift: Tensor | None = None, shift_scale: float = 1.0) -> Tensor:
        """One calibrated block on the new stream: ``stream + W_o ((A + s·E) v) + b_o`` (EXCEL_SPEC §3.1, §4.2).

        ``a_svc`` (B, T, T) head-reduced map; ``v`` (B, T, D) merged values; ``shift`` (B, N, N) per-head LVC
        shift ``E`` added to the patch×patch block of every head's map before the head reduction, i.e.
        ``shift_scale`` (H for the head sum) times ``E`` on the reduced map; computed as ``A v + s·E v_patch``.
        """
        av = torch.matmul(a_svc, v)
        if shift is not None:
            av = torch.cat([av[:, :1], av[:, 1:] + shift_scale * torch.matmul(shift, v[:, 1:])], dim=1)
        delta = F.linear(av, block.attn.out_proj.weight, block.attn.out_proj.bias)
        return stream + block.ls_1(delta)

    def calibrate(self, cache: SvcCache, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Stage (b): the SVC dual path from a stage-(a) cache, with an optional LVC shift (EXCEL_SPEC §4.2).

        Args:
            cache: from ``forward(..., keep_cache=True)``.
            shift: (B, N, N) LVC shift ``E`` (e.g. :func:`excelseg.lvc.lvc_shift`), or None (static SVC; then
                the result equals the forward's ``features`` / ``svc_stream`` bit for bit). A mode's cache
                (``attention`` not svc) re-runs its last block with ``E`` added to every head's patch×patch map.

        Returns:
            features (B, T, E) after ln_post and projection, and the calibrated stream (B, T, D) with the
            original stream's CLS token.
        """
        n = cache.start.shape[1] - 1
        if shift is not None and shift.shape != (cache.start.shape[0], n, n):
            raise ValueError(f"shift must be {(cache.start.shape[0], n, n)}, got {tuple(shift.shape)}")
        blocks = self.visual.transformer.resblocks
        if cache.attention != "svc":  # a last-block mode: re-run that block on its cached input, E on every head
            block = blocks[cache.blocks[0]]
            q, k, v = self._qkv(block, block.ln_1(cache.start))
            scale = (cache.start.shape[-1] // self.num_heads) ** -0.5
            stream = self._mode_block(block, cache.start, q, k, v, cache.attention, cache.grid, scale,
                                      None if shift is None else shift.to(v.dtype))
            stream = torch.cat([cache.cls, stream[:, 1:]], dim=1)
            return self.visual.ln_post(stream) @ self.visual.proj, stream
        stream = cache.start
        for i, a_svc, v in zip(cache.blocks, cache.maps, cache.values):
            stream = self._svc_step(blocks[i], stream, a_svc, v,
                                    None if shift is None else shift.to(v.dtype), cache.shift_scale)
        stream = torch.cat([cache.cls, stream[:, 1:]], dim=1)
        return self.visual.ln_post(stream) @ self.visual.proj, stream
