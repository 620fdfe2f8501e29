/* Vector types and helpers shared by the native kernels (par.c, attention.c): GCC/Clang generic vectors one
 * register wide, unaligned loads and stores, a broadcast, exp for non-positive arguments, and the rows of an
 * OpenMP thread. */
#ifndef EXCELSEG_VEC_H
#define EXCELSEG_VEC_H
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* VL: floats per vector, one native register. GCC lowers generic vectors wider than the target's registers piece
 * by piece (-Wvector-operation-performance), through memory: 16-float vectors on an AVX2 CPU made every kernel ~8×
 * slower (Zen 3, 375×500×4: 20 iterations 300 → 38 ms with VL 8). 512-bit with AVX-512F, 256-bit with AVX, else
 * 128-bit (SSE2, NEON). The Python side reads it (excelseg_par_vector_length) for PAR's layouts; every pixel's
 * operations there are the same for any VL, so PAR's results are bit-identical across widths. */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* every lane = a: x + (−0) is x for every x, so this folds to one broadcast (with +0 it would cost an add) */
static inline vf bc(float a) { return a + -(vf){0}; }

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

/* Rows [lo, hi) of n for the calling thread of an OpenMP team (all n without OpenMP). Built with OpenMP, the kernels
 * need libgomp.so.1, which in a process that has loaded torch (built with GNU OpenMP) is torch's own copy: their
 * loops run on the threads that torch's loops just left spinning instead of competing with them for the cores
 * (threads of our own lost up to half their speed that way on 2 cores). */
static inline void thread_rows(int n, int *lo, int *hi)
{
    int id = 0, team = 1;
#ifdef _OPENMP
    id = omp_get_thread_num();
    team = omp_get_num_threads();
#endif
    *lo = (int)((int64_t)n * id / team);
    *hi = (int)((int64_t)n * (id + 1) / team);
}

/* 1 when built with OpenMP */
static inline int built_with_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#endif
