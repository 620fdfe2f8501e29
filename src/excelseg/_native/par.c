/* Pixel-adaptive refinement (PAR, EXCEL_SPEC §3.4) on the CPU: the affinity and the iterations as fused loops.
 *
 * Built on first use by excelseg/native/__init__.py with the system C compiler and called through ctypes;
 * excelseg.par.par falls back to its torch implementation when no compiler is available. It computes what that
 * implementation computes in the same order of operations (no FMA contraction: -ffp-contract=off), so the two agree
 * to float rounding; the one approximation is exp (exp_nonpos: relative error ≤ 1.1e-7; torch: Sleef, ≤ 1 ulp).
 *
 * Layouts (float32, C-contiguous, one image per call; p ≥ the largest offset, Wv = W rounded up to a multiple of VL):
 *   image  3 × (H + 2p) × (Wv + 2p)   the guidance image at the mask size, replicate-padded on every side
 *   w      H × (Wv / VL) × Nn × VL    per row, per tile of VL pixels, the Nn neighbour weights of those pixels
 *   maps   C × H × (Wv + 2p)          score maps with p replicate columns on each side (rows are clamped instead)
 * Every row is a whole number of VL-wide vectors: the columns W … Wv−1 are computed like the others, then
 * overwritten by the right replicate border, which is rewritten after every row.
 *
 * Speed (docs/benchmarks.md): an iteration streams 48 weights per pixel and makes 48 shifted loads per channel.
 * Within a row tile the Nn weight vectors are contiguous and up to four channels are summed in registers, so each
 * weight is loaded once per block of channels and each output stored once. Iterations run as a wavefront: iteration
 * i + 1 processes row y as soon as iteration i has produced row y + d_max, so `group` iterations use each weight row
 * while it is still in cache.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define VL 16
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* exp(x) for x ≤ 0 (the softmax's shifted logits), VL lanes: 2^n · P(r) with n = round(x / ln2) (by the 1.5·2^23
 * rounding trick, which also leaves n in the low mantissa bits), r = x − n·ln2 ∈ [−ln2/2, ln2/2] (ln2 in two parts)
 * and P the degree-7 Taylor polynomial: relative error ≤ 1.1e-7 (measured against double exp on 1.4·10⁹ points of
 * [−87, 0]). x is clamped at −87, where e^x < 2e-38 vanishes against the softmax's sum (≥ 1) either way. */
static inline vf exp_nonpos(vf x)
{
    const vf zero = {0}, lo = zero - 87.0f, magic = zero + 12582912.0f;
    const vi small = x < lo;
    x = (vf)(((vi)x & ~small) | ((vi)lo & small));
    const vf t = x * 1.44269504f + magic;
    const vf n = t - magic;
    vf r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    vf p = zero + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi e = ((vi)t - (vi)magic + 127) << 23;
    return p * (vf)e;
}

/* Weights of row y: softmax over the Nn neighbours of −mean_c((I_n − I) / ((std_n(I_n) + 1e-8) · w_color))², plus
 * pos[n], written tile by tile (w[y][t][n][VL]). scratch: 4·Wv floats. */
static void affinity_row(const float *image, float *w, const int64_t *dys, const int64_t *dxs, int nn, int h,
                         int wv, int pad, int y, float w_color, const float *pos, float *scratch)
{
    const size_t ip = (size_t)wv + 2 * (size_t)pad, plane = (size_t)(h + 2 * pad) * ip;
    float *inv = scratch, *tmp = scratch + 3 * (size_t)wv;
    /* per channel: mean over the neighbours, then the unbiased std (two-pass), as 1 / ((std + 1e-8) · w_color) */
    for (int c = 0; c < 3; c++) {
        const float *img = image + c * plane;
        float *m = inv + (size_t)c * wv;
        const float *s0 = img + (size_t)(y + pad + dys[0]) * ip + pad + dxs[0];
        for (int x = 0; x < wv; x++) m[x] = s0[x];
        for (int n = 1; n < nn; n++) {
            const float *s = img + (size_t)(y + pad + dys[n]) * ip + pad + dxs[n];
            for (int x = 0; x < wv; x++) m[x] += s[x];
        }
        for (int x = 0; x < wv; x++) m[x] /= (float)nn;
        for (int x = 0; x < wv; x++) tmp[x] = 0.0f;
        for (int n = 0; n < nn; n++) {
            const float *s = img + (size_t)(y + pad + dys[n]) * ip + pad + dxs[n];
            for (int x = 0; x < wv; x++) {
                float d = s[x] - m[x];
                tmp[x] += d * d;
            }
        }
        for (int x = 0; x < wv; x++) m[x] = 1.0f / ((sqrtf(tmp[x] / (float)(nn - 1)) + 1e-8f) * w_color);
    }
    /* per tile of VL pixels: the Nn logits, their softmax and the positional term, all in L1 */
    const float *row[3];
    for (int c = 0; c < 3; c++) row[c] = image + c * plane + (size_t)(y + pad) * ip + pad;
    const int nt = wv / VL;
    for (int t = 0; t < nt; t++) {
        const int x = t * VL;
        float *blk = w + ((size_t)y * nt + t) * (size_t)nn * VL;
        const vf i0 = ld(row[0] + x), i1 = ld(row[1] + x), i2 = ld(row[2] + x);
        const vf v0 = ld(inv + x), v1 = ld(inv + wv + x), v2 = ld(inv + 2 * (size_t)wv + x);
        vf mx = {0};
        for (int n = 0; n < nn; n++) {
            const size_t o = (size_t)(dys[n] * (int64_t)ip + dxs[n]) + x;
            const vf d0 = (ld(row[0] + o) - i0) * v0, d1 = (ld(row[1] + o) - i1) * v1;
            const vf d2 = (ld(row[2] + o) - i2) * v2;
            const vf l = ((d0 * d0 + d1 * d1) + d2 * d2) * (-1.0f / 3.0f);
            st(blk + n * VL, l);
            if (n == 0) {
                mx = l;
            } else {
                const vi gt = l > mx;
                mx = (vf)(((vi)l & gt) | ((vi)mx & ~gt));
            }
        }
        vf sum = {0};
        for (int n = 0; n < nn; n++) {
            const vf e = exp_nonpos(ld(blk + n * VL) - mx);
            st(blk + n * VL, e);
            sum = sum + e;
        }
        const vf rs = 1.0f / sum;
        for (int n = 0; n < nn; n++) st(blk + n * VL, ld(blk + n * VL) * rs + pos[n]);
    }
}

void excelseg_par_affinity(const float *image, float *w, const int64_t *dys, const int64_t *dxs, int nn, int h,
                           int wv, int pad, float w_color, const float *pos, int y0, int y1, float *scratch)
{
    for (int y = y0; y < y1; y++) affinity_row(image, w, dys, dxs, nn, h, wv, pad, y, w_color, pos, scratch);
}

/* dst row y ← Σ_n w[y, ·, n] · (src row clamp(y + dy_n) shifted by dx_n), for `nc` (1…4) channels: per tile of VL
 * pixels, the tile's Nn weight vectors are contiguous and the channels' sums stay in registers. */
static inline __attribute__((always_inline)) void step_row(const float *w, const float *src, float *dst,
                                                           const int64_t *off, int nn, size_t cs, size_t drow,
                                                           int wv, const int nc)
{
    for (int x = 0; x < wv; x += VL, w += (size_t)nn * VL) {
        vf a0, a1, a2, a3, wt = ld(w);
        const float *s = src + off[0] + x;
        a0 = wt * ld(s);
        if (nc > 1) a1 = wt * ld(s + cs);
        if (nc > 2) a2 = wt * ld(s + 2 * cs);
        if (nc > 3) a3 = wt * ld(s + 3 * cs);
#pragma GCC unroll 4
        for (int n = 1; n < nn; n++) {
            wt = ld(w + n * VL);
            s = src + off[n] + x;
            a0 = a0 + wt * ld(s);
            if (nc > 1) a1 = a1 + wt * ld(s + cs);
            if (nc > 2) a2 = a2 + wt * ld(s + 2 * cs);
            if (nc > 3) a3 = a3 + wt * ld(s + 3 * cs);
        }
        st(dst + drow + x, a0);
        if (nc > 1) st(dst + drow + cs + x, a1);
        if (nc > 2) st(dst + drow + 2 * cs + x, a2);
        if (nc > 3) st(dst + drow + 3 * cs + x, a3);
    }
}

/* `iters` PAR steps on channels [c0, c1) of one image, ping-ponging between maps0 and maps1 (the result is in
 * maps0 for an even `iters`, else in maps1); `off` is scratch for nn offsets.
 *
 * Iterations run in groups of `group`, each group as a wavefront over the rows: iteration j of the group lags
 * iteration j − 1 by d_max + 1 rows, so it reads only rows its predecessor has finished and overwrites (in the
 * buffer it shares with iteration j − 2) only rows its predecessor no longer reads. (Tried and dropped: vertical
 * strips skewed the same way in x, to keep a strip's weights in L2 — slower, the weight stream is no longer
 * sequential; with the weights always in cache the iterations would be only ~25 % faster.) */
void excelseg_par_iterate(const float *w, float *maps0, float *maps1, const int64_t *dys, const int64_t *dxs, int nn,
                          int h, int width, int wv, int pad, int c0, int c1, int iters, int group, int64_t *off)
{
    const size_t wp = (size_t)wv + 2 * (size_t)pad, cs = (size_t)h * wp, wrow = (size_t)nn * wv;
    int dy_max = 0;
    for (int n = 0; n < nn; n++) {
        const int ay = (int)(dys[n] < 0 ? -dys[n] : dys[n]);
        dy_max = ay > dy_max ? ay : dy_max;
    }
    const int skew = dy_max + 1;
    for (int it0 = 0; it0 < iters; it0 += group) {
        const int k = iters - it0 < group ? iters - it0 : group;
        for (int s = 0; s < h + skew * (k - 1); s++) {
            for (int j = 0; j < k; j++) {
                const int y = s - skew * j;
                if (y < 0 || y >= h) continue;
                const int it = it0 + j;
                const float *src = (it % 2 ? maps1 : maps0) + (size_t)c0 * cs;
                float *dst = (it % 2 ? maps0 : maps1) + (size_t)c0 * cs;
                for (int n = 0; n < nn; n++) {
                    int64_t r = y + dys[n];
                    r = r < 0 ? 0 : (r >= h ? h - 1 : r);
                    off[n] = r * (int64_t)wp + pad + dxs[n];
                }
                const size_t drow = (size_t)y * wp + pad;
                const float *wy = w + y * wrow;
                /* channels in blocks of at most 4, as even as possible (5 = 3 + 2, not 4 + 1) */
                const int blocks = (c1 - c0 + 3) / 4;
                for (int bi = 0, c = c0, nc; bi < blocks; bi++, c += nc, src += nc * cs, dst += nc * cs) {
                    nc = (c1 - c + blocks - bi - 1) / (blocks - bi);
                    switch (nc) {
                    case 1: step_row(wy, src, dst, off, nn, cs, drow, wv, 1); break;
                    case 2: step_row(wy, src, dst, off, nn, cs, drow, wv, 2); break;
                    case 3: step_row(wy, src, dst, off, nn, cs, drow, wv, 3); break;
                    default: step_row(wy, src, dst, off, nn, cs, drow, wv, 4); break;
                    }
                    for (int i = 0; i < nc; i++) {  /* the replicate columns of the new row */
                        float *row = dst + i * cs + (size_t)y * wp;
                        const float left = row[pad], right = row[pad + width - 1];
                        for (int x = 0; x < pad; x++) row[x] = left;
                        for (int x = pad + width; x < (int)wp; x++) row[x] = right;
                    }
                }
            }
        }
    }
}
