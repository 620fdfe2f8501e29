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
 * while it is still in cache. One image's iterations can be split into bands of rows, one thread each (each streams
 * only its band's weights), synchronised row by row at the band boundaries by progress counters.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

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

int excelseg_par_vector_length(void) { return VL; }

/* 1 when built with OpenMP (excelseg_par_affinity_all then runs on the process's OpenMP threads; vec.h) */
int excelseg_par_openmp(void) { return built_with_openmp(); }

void excelseg_par_affinity(const float *image, float *w, const int64_t *dys, const int64_t *dxs, int nn, int h,
                           int wv, int pad, float w_color, const float *pos, int y0, int y1, float *scratch)
{
    for (int y = y0; y < y1; y++) affinity_row(image, w, dys, dxs, nn, h, wv, pad, y, w_color, pos, scratch);
}

/* The weights of all h rows, split over `threads` OpenMP threads (one thread without OpenMP); every row is computed
 * alone, so the bits do not depend on the split. Returns 0, or −1 when a thread's scratch could not be allocated
 * (the weights are then incomplete). */
int excelseg_par_affinity_all(const float *image, float *w, const int64_t *dys, const int64_t *dxs, int nn, int h,
                              int wv, int pad, float w_color, const float *pos, int threads)
{
    int failed = 0;
    (void)threads;  /* without OpenMP: one thread */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int y0, y1;
        thread_rows(h, &y0, &y1);
        float *scratch = malloc(4 * (size_t)wv * sizeof(float));
        if (scratch == NULL)
            failed = 1;
        else
            excelseg_par_affinity(image, w, dys, dxs, nn, h, wv, pad, w_color, pos, y0, y1, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
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

/* The arguments of one excelseg_par_iterate call, shared by its band threads. */
struct job {
    const float *w;
    float *maps0, *maps1;
    const int64_t *dys, *dxs;
    int nn, h, width, wv, pad, c, iters, group, bands, skew;
    _Atomic int64_t *done;  /* per band, SLOT apart: 1 + the key of the last row it finished */
    _Atomic int gate;       /* 0: wait, 1: go, −1: a thread failed to start, return */
};
#define SLOT 8  /* int64 per progress counter: counters of different bands never share a 64-byte cache line */
#define SPINS 256  /* pause instructions before a waiting thread yields its core */

/* Iteration `it` of row y, all channels: reads the maps of iteration it − 1, writes those of it. */
static void iterate_row(const struct job *jb, int it, int y, int64_t *off)
{
    const int nn = jb->nn, wv = jb->wv, pad = jb->pad, h = jb->h, width = jb->width;
    const size_t wp = (size_t)wv + 2 * (size_t)pad, cs = (size_t)h * wp, wrow = (size_t)nn * wv;
    const float *src = it % 2 ? jb->maps1 : jb->maps0;
    float *dst = it % 2 ? jb->maps0 : jb->maps1;
    for (int n = 0; n < nn; n++) {
        int64_t r = y + jb->dys[n];
        r = r < 0 ? 0 : (r >= h ? h - 1 : r);
        off[n] = r * (int64_t)wp + pad + jb->dxs[n];
    }
    const size_t drow = (size_t)y * wp + pad;
    const float *wy = jb->w + y * wrow;
    /* channels in blocks of at most 4, as even as possible (5 = 3 + 2, not 4 + 1) */
    const int blocks = (jb->c + 3) / 4;
    for (int bi = 0, c = 0, nc; bi < blocks; bi++, c += nc, src += nc * cs, dst += nc * cs) {
        nc = (jb->c - c + blocks - bi - 1) / (blocks - bi);
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

/* Band t of `bands` (rows [y0, y1), y0 = ⌊t·h / bands⌋) and its schedule. Even bands run their wavefronts top-down,
 * odd ones bottom-up, so two bands reach their shared boundary at the same step (both start there, or both end
 * there). A row's position p in its band's sweep is shifted by hmax − (y1 − y0) so that every band ends its sweep
 * at p = hmax − 1; row y of iteration i (group g = i / group, j = i % group) is done at step p + skew·j of that
 * group, and its key — ((g·L + step)·group + j, L = steps per whole group) — orders all rows of all bands. */
struct band {
    int y0, y1, shift, up;
};

static struct band band_of(const struct job *jb, int t)
{
    const int hmax = (jb->h + jb->bands - 1) / jb->bands;
    struct band b = {(int)((int64_t)t * jb->h / jb->bands), (int)((int64_t)(t + 1) * jb->h / jb->bands), 0, t % 2};
    b.shift = hmax - (b.y1 - b.y0);
    return b;
}

static int64_t key(const struct job *jb, int i, int p)
{
    const int64_t steps = (jb->h + jb->bands - 1) / jb->bands + (int64_t)jb->skew * (jb->group - 1);
    return ((i / jb->group) * steps + p + (int64_t)jb->skew * (i % jb->group)) * jb->group + i % jb->group;
}

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void wait_until(const _Atomic int64_t *counter, int64_t value)
{
    for (int n = 0; atomic_load_explicit(counter, memory_order_acquire) < value;) {
        if (n < SPINS) {
            n++;
            relax();
        } else {
            sched_yield();
        }
    }
}

/* Before row y of iteration i + 1 in band t: wait until the other bands have finished the rows y ± dy_max of
 * iteration i. That covers what the row reads (iteration i's rows y + dy, clamped) and the write-after-read hazard:
 * the row overwrites iteration i − 1's row y in the other ping-pong buffer, which only iteration i's rows within
 * dy_max of y read. The key order is a topological order of these dependencies (band heights differ by at most 1,
 * so the positions of rows within dy_max of each other differ by at most skew), and every band runs its rows in key
 * order, so no wait can deadlock. */
static void wait_inputs(const struct job *jb, int t, int i, int y, int dy_max)
{
    const int lo = y - dy_max < 0 ? 0 : y - dy_max, hi = y + dy_max >= jb->h ? jb->h - 1 : y + dy_max;
    for (int u = 0; u < jb->bands; u++) {
        const struct band b = band_of(jb, u);
        const int a = lo > b.y0 ? lo : b.y0, z = hi < b.y1 - 1 ? hi : b.y1 - 1;
        if (u == t || a > z) continue;
        const int p = (b.up ? b.y1 - 1 - a : z - b.y0) + b.shift;  /* the row of [a, z] its band finishes last */
        wait_until(jb->done + (size_t)u * SLOT, key(jb, i, p) + 1);
    }
}

/* Iterations run in groups of `group`, each group as a wavefront over the band's rows: iteration j of the group
 * lags iteration j − 1 by skew = dy_max + 1 rows, so within the band it reads only rows its predecessor has finished
 * and overwrites (in the buffer it shares with iteration j − 2) only rows its predecessor no longer reads. (Tried and
 * dropped: vertical strips skewed the same way in x, to keep a strip's weights in L2 — slower, the weight stream is
 * no longer sequential; with the weights always in cache the iterations would be only ~25 % faster.) */
static void run_band(const struct job *jb, int t)
{
    int64_t off[jb->nn];
    const struct band b = band_of(jb, t);
    const int hmax = (jb->h + jb->bands - 1) / jb->bands, skew = jb->skew;
    for (int it0 = 0; it0 < jb->iters; it0 += jb->group) {
        const int k = jb->iters - it0 < jb->group ? jb->iters - it0 : jb->group;
        for (int s = 0; s < hmax + skew * (k - 1); s++) {
            for (int j = 0; j < k; j++) {
                const int q = s - skew * j - b.shift;
                if (q < 0 || q >= b.y1 - b.y0) continue;
                const int y = b.up ? b.y1 - 1 - q : b.y0 + q, it = it0 + j;
                if (jb->bands > 1 && it > 0) wait_inputs(jb, t, it - 1, y, skew - 1);
                iterate_row(jb, it, y, off);
                if (jb->bands > 1)
                    atomic_store_explicit(jb->done + (size_t)t * SLOT, key(jb, it, q + b.shift) + 1,
                                          memory_order_release);
            }
        }
    }
}

struct worker {
    struct job *jb;
    int t;
};

static void *worker_main(void *arg)
{
    const struct worker *wk = arg;
    int go;
    while (!(go = atomic_load_explicit(&wk->jb->gate, memory_order_acquire))) sched_yield();
    if (go > 0) run_band(wk->jb, wk->t);
    return NULL;
}

/* `iters` PAR steps on the c channels of one image, ping-ponging between maps0 and maps1 (the result is in
 * maps0 for an even `iters`, else in maps1), with the rows split into `bands` bands (at most h), one thread each:
 * the calling thread runs band 0 and starts the others. Every row is computed by the same operations from the same
 * inputs whatever the bands and `group`, so the result is bit-identical for any of them. If a thread cannot be
 * started, those already started return without work and the calling thread runs the whole image as one band. */
void excelseg_par_iterate(const float *w, float *maps0, float *maps1, const int64_t *dys, const int64_t *dxs, int nn,
                          int h, int width, int wv, int pad, int c, int iters, int group, int bands, int openmp)
{
    int dy_max = 0;
    for (int n = 0; n < nn; n++) {
        const int ay = (int)(dys[n] < 0 ? -dys[n] : dys[n]);
        dy_max = ay > dy_max ? ay : dy_max;
    }
    bands = bands < 1 ? 1 : (bands > h ? h : bands);
    _Atomic int64_t done[bands * SLOT];
    struct job jb = {w, maps0, maps1, dys, dxs, nn, h, width, wv, pad, c, iters, group, bands, dy_max + 1,
                     done, 0};
    for (int t = 0; t < bands; t++) atomic_init(&done[t * SLOT], 0);
#ifdef _OPENMP
    if (openmp && bands > 1) {  /* the bands on the process's OpenMP threads (vec.h); fewer than asked: one band */
#pragma omp parallel num_threads(bands)
        {
#pragma omp single
            if (omp_get_num_threads() != bands) jb.bands = 1;
            /* (the end of `single` is a barrier: every thread sees the final band count) */
            if (jb.bands == bands)
                run_band(&jb, omp_get_thread_num());
            else if (omp_get_thread_num() == 0)
                run_band(&jb, 0);
        }
        return;
    }
#else
    (void)openmp;
#endif
    pthread_t tids[bands];
    struct worker workers[bands];
    int started = 1;
    for (; started < bands; started++) {
        workers[started] = (struct worker){&jb, started};
        if (pthread_create(&tids[started], NULL, worker_main, &workers[started]) != 0) break;
    }
    atomic_store_explicit(&jb.gate, started == bands ? 1 : -1, memory_order_release);
    if (started == bands) run_band(&jb, 0);
    for (int t = 1; t < started; t++) pthread_join(tids[t], NULL);
    if (started < bands) {
        jb.bands = 1;
        run_band(&jb, 0);
    }
}
