/* Dense-CLIP attention maps on the CPU with the softmax fused into the matrix products (paper §3.3, EXCEL_SPEC §3.1
 * and §3.3 step 1): the SVC map Σ_m softmax(s·z_m z_mᵀ) and the plain attention with its head-summed map.
 *
 * Built on first use by excelseg/_native/__init__.py (like par.c, but with FMA contraction: the products are
 * ordinary float32 matrix products, whose summation order torch does not fix either) and called through ctypes;
 * excelseg.calibration / excelseg.backbone use torch ops when it is not available. Rows of a T × T map are made
 * R at a time — their logits, softmax and use happen while the R × Tp block is in L1 — so no per-head T × T map is
 * ever written to memory: torch writes, re-reads and sums 36 such maps per calibrated block (7.7 MB each set of
 * 12 at 320 px), and that traffic, not the arithmetic, was most of its time (docs/benchmarks.md).
 *
 * One entry point, excelseg_softmax_maps, serves both. Layouts (float32): per map m a row-major T × d operand a[m]
 * (row stride lda, unit column stride) and the transposed operand bt (nm × d × Tp, Tp = T rounded up to a multiple
 * of excelseg_attn_tile(), zero padded); the map sum is added to a T × T row-major output whose rows the threads
 * split. Accuracy: float32 products (FMA) and exp_nonpos (relative error ≤ 1.1e-7); tests/test_native_attention.py
 * holds both uses to float64.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define R 6  /* rows per register tile: R × 2 accumulators + 2 operand vectors + 1 broadcast ≤ 16 registers */
#define TILE (2 * VL)  /* columns per register tile */
#define PANEL 48  /* rows whose outputs stay in L2 while every map's transposed operand streams past them */

int excelseg_attn_tile(void) { return TILE; }

/* 1 when built with OpenMP: the rows then run on the process's OpenMP threads (torch's; vec.h) */
int excelseg_attn_openmp(void) { return built_with_openmp(); }

static inline vf vmax(vf a, vf b)
{
    const vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

static inline vi iota(void)
{
    vi lane;
    for (int l = 0; l < VL; l++) lane[l] = l;
    return lane;
}

/* c[r][0 … n) = Σ_k a[r][k] · b[k·ldb + 0 … n) for the R rows a[0 … R), n a multiple of TILE. With mx (softmax
 * logits): the sums are multiplied by s (as torch's `mul_(s)` after the product), the columns ≥ valid set to −∞,
 * and mx[r] becomes the running maximum of row r — the logits need no separate pass before their exp. */
static void mm_tile(const float *const a[R], int k, const float *b, size_t ldb, int n, float *c, size_t ldc,
                    float s, int valid, vf *mx)
{
    const vf sv = bc(s), ninf = bc(-INFINITY);
    for (int j = 0; j < n; j += TILE) {
        vf acc[R][2];
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (vf){0};
        const float *bk = b + j;
        for (int kk = 0; kk < k; kk++, bk += ldb) {
            const vf b0 = ld(bk), b1 = ld(bk + VL);
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                const vf av = bc(a[r][kk]);
                acc[r][0] += av * b0;
                acc[r][1] += av * b1;
            }
        }
        if (mx != NULL) {
            const vi in0 = iota() + j < valid, in1 = iota() + (j + VL) < valid;
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                acc[r][0] = (vf)(((vi)(acc[r][0] * sv) & in0) | ((vi)ninf & ~in0));
                acc[r][1] = (vf)(((vi)(acc[r][1] * sv) & in1) | ((vi)ninf & ~in1));
                mx[r] = vmax(mx[r], vmax(acc[r][0], acc[r][1]));
            }
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            st(c + (size_t)r * ldc + j, acc[r][0]);
            st(c + (size_t)r * ldc + j + VL, acc[r][1]);
        }
    }
}

/* The R logit rows lg (R × tp) of rows a[0 … R) against bt: s · a bt, columns ≥ t at −∞, and each row's maximum. */
static void logits(const float *const a[R], const float *bt, int t, int tp, int d, float s, float *lg, float mx[R])
{
    vf m[R];
    for (int r = 0; r < R; r++) m[r] = bc(-INFINITY);
    mm_tile(a, d, bt, tp, tp, lg, tp, s, t, m);
    for (int r = 0; r < R; r++) {
        mx[r] = m[r][0];
        for (int l = 1; l < VL; l++) mx[r] = m[r][l] > mx[r] ? m[r][l] : mx[r];
    }
}

/* x[0 … t) ← exp(x − mx) (x: logits from `logits`, mx their maximum); returns 1 / Σ. The lanes of the last vector
 * past t (−∞) become 0. */
static float softmax_exp(float *x, int t, float mx)
{
    const int nv = (t + VL - 1) / VL;
    const vi in_last = iota() + (nv - 1) * VL < t;
    const vf mv = bc(mx);
    vf sum = {0};
    for (int v = 0; v < nv; v++) {
        vf e = exp_nonpos(ld(x + v * VL) - mv);
        if (v == nv - 1) e = (vf)((vi)e & in_last);
        st(x + v * VL, e);
        sum += e;
    }
    float total = 0.0f;
    for (int l = 0; l < VL; l++) total += sum[l];
    return 1.0f / total;
}

/* o[0 … t) += x[0 … t) · g */
static void add_scaled(float *o, const float *x, float g, int t)
{
    const vf gv = bc(g);
    int j = 0;
    for (; j + VL <= t; j += VL) st(o + j, ld(o + j) + ld(x + j) * gv);
    for (; j < t; j++) o[j] += x[j] * g;
}

/* The R operand rows from row i0 on, clamped to the last row (the extra rows are computed and not used). */
static void rows_from(const float *a, size_t lda, int i0, int t, const float *rows[R])
{
    for (int r = 0; r < R; r++) rows[r] = a + (size_t)(i0 + r < t ? i0 + r : t - 1) * lda;
}

/* Rows [r0, r1) of Σ_m P_m, P_m = softmax_j(s · a[m][i] · bt[m][·, j]) over nm maps, added to map (T × T): for
 * SVC a = the 3H per-head q, k and v and bt their transposes; for the plain attention a = q[h], bt = k[h]ᵀ. When
 * v is given (attention), also o[m] row i = P_m[i, ·] · v[m] for rows i < rows_out (v rows of stride ldv, d a
 * multiple of TILE; o rows of stride ldo). scratch: R · Tp + R · d floats. */
static void maps_rows(const float *const *a, size_t lda, const float *bt, int nm, int t, int tp, int d, float s,
                      float *map, const float *const *v, size_t ldv, float *const *o, size_t ldo, int rows_out,
                      int r0, int r1, float *scratch)
{
    const float *rows[R], *prob[R];
    float *pv = scratch + (size_t)R * tp, mx[R];
    for (int p0 = r0; p0 < r1; p0 += PANEL) {  /* a panel's map rows stay in L2 while every bt[m] streams past */
        const int p1 = p0 + PANEL < r1 ? p0 + PANEL : r1;
        for (int m = 0; m < nm; m++) {
            const float *btm = bt + (size_t)m * d * tp;
            for (int i0 = p0; i0 < p1; i0 += R) {
                const int values = v != NULL && i0 < rows_out;  /* this block's P rows are multiplied by v */
                rows_from(a[m], lda, i0, t, rows);
                logits(rows, btm, t, tp, d, s, scratch, mx);
                int n = 0;
                for (; n < R && i0 + n < p1; n++) {
                    float *x = scratch + (size_t)n * tp;
                    const float inv = softmax_exp(x, t, mx[n]);
                    add_scaled(map + (size_t)(i0 + n) * t, x, inv, t);
                    if (values) {  /* the same normalised row, in place, for P v */
                        const vf g = bc(inv);
                        for (int j = 0; j < tp; j += VL) st(x + j, ld(x + j) * g);
                    }
                }
                if (!values) continue;
                for (int r = 0; r < R; r++) prob[r] = scratch + (size_t)(r < n ? r : n - 1) * tp;
                mm_tile(prob, t, v[m], ldv, d, pv, d, 1.0f, d, NULL);
                for (int r = 0; r < n && i0 + r < rows_out; r++)
                    memcpy(o[m] + (size_t)(i0 + r) * ldo, pv + (size_t)r * d, (size_t)d * sizeof(float));
            }
        }
    }
}

/* One image's maps_rows over all T rows, split over `threads` threads (map: zero, or maps to add to; v, o: NULL
 * for the map alone). Returns 0, or −1 when scratch memory could not be allocated (the outputs are then
 * incomplete). */
int excelseg_softmax_maps(const float *const *a, size_t lda, const float *bt, int nm, int t, int tp, int d, float s,
                          float *map, const float *const *v, size_t ldv, float *const *o, size_t ldo, int rows_out,
                          int threads)
{
    int failed = 0;
    (void)threads;  /* without OpenMP: one thread */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int r0, r1;
        thread_rows(t, &r0, &r1);
        float *scratch = malloc(((size_t)R * tp + (size_t)R * d) * sizeof(float));
        if (scratch == NULL)
            failed = 1;
        else
            maps_rows(a, lda, bt, nm, t, tp, d, s, map, v, ldv, o, ldo, rows_out, r0, r1, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}
