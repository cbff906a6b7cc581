/* Exact softmax attention for tiles of up to LANES queries, in plain C with vector extensions.
 *
 * headwise compiles this file on first use (see tiles.py) with -O3 -march=native. One work item
 * is (batch, head, tile): the tile's queries sit in the lanes of one vector, its keys are runs
 * ("segments") of consecutive positions, and a key entry carries a bit per lane saying which of
 * the tile's queries may see it. For every key the kernel computes all LANES scores at once:
 *
 *     S[n] = scale * log2(e) * (q_lane . k_n)      one vector FMA per head dimension
 *     P[n] = 2^(S[n] - max_n S[n]),  l = sum_n P[n],  O_lane = sum_n P[n] v_n / l,
 *     lse_lane = ln(2) * (max_n S[n] + log2 l)       (natural log, -inf for a query seeing nothing)
 *
 * K is read transposed ([dim][position]) so that the keys of a segment are consecutive floats:
 * the inner loop is a broadcast-FMA with a constant displacement, with KEY_CHUNK accumulators in
 * registers. Unlike a rectangular kernel call (every query of a group against the whole union of
 * its keys, as a block of a fused attention kernel), the K panel needs no packing per tile, and
 * the tile can be small (4 x 4 on a 2-D grid) without losing GEMM efficiency.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

#if defined(__AVX512F__)
#define KEY_CHUNK 8
#define DIM_CHUNK 16
#else
#define KEY_CHUNK 4
#define DIM_CHUNK 6
#endif

struct problem {
    const float *q; int64_t q_sb, q_st, q_sh;          /* q[b, t, h, d], d contiguous */
    const float *k; int64_t k_sb, k_st, k_sh;          /* k[b, t, hk, d], d contiguous */
    const float *v; int64_t v_sb, v_st, v_sh;          /* v[b, t, hk, d], d contiguous */
    float *out; int64_t o_sb, o_st, o_sh;              /* out[b, t, h, d], d contiguous */
    float *lse; int64_t l_sb, l_sh;                    /* lse[b, h, t] */
    int64_t heads, group, dim, dim_v;                  /* group: query heads per K/V head */
    double scale_log2;                                 /* softmax scale * log2(e) */
    int64_t tiles, max_keys;
    const int32_t *rows;        /* [tiles][LANES] query positions, -1: empty lane */
    const int64_t *seg_offsets; /* [tiles + 1] into seg_start / seg_len */
    const int32_t *seg_start, *seg_len;
    const int64_t *bit_offsets; /* [tiles] into bits (key entries in segment order); -1: none */
    const int32_t *bits;        /* lane bits per key entry, per head of the pattern */
    int64_t bits_head_stride;   /* 0 when every head shares the pattern */
};

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf select_bits(vi keep, vf a, vf b) {
    return (vf)(((vi)a & keep) | ((vi)b & ~keep));
}

/* 2^x for x <= 0 (exactly 0 below -126, -inf included): 2^round(x) times a degree-7 Taylor
 * polynomial of 2^f on [-1/2, 1/2] (relative error < 1e-8 before rounding). */
static inline vf exp2_vec(vf x) {
    vi underflow = x < splat(-126.0f);
    x = select_bits(underflow, splat(-126.0f), x);
    vf r = (x + splat(12582912.0f)) - splat(12582912.0f); /* round to nearest */
    vf f = (x - r) * splat(0.69314718055994531f);
    vf p = splat(1.0f / 5040.0f);
    p = p * f + splat(1.0f / 720.0f);
    p = p * f + splat(1.0f / 120.0f);
    p = p * f + splat(1.0f / 24.0f);
    p = p * f + splat(1.0f / 6.0f);
    p = p * f + splat(0.5f);
    p = p * f + splat(1.0f);
    p = p * f + splat(1.0f);
    vi n = __builtin_convertvector(r, vi);
    vf two_n = (vf)((n + 127) << 23);
    return select_bits(underflow, splat(0.0f), p * two_n);
}

/* scores of N keys at consecutive positions (row stride st): N accumulators, one broadcast FMA
 * per key and dimension, each key read through its own pointer at constant displacements */
#define DEFINE_QK(N)                                                                       \
    static void qk_##N(const vf *qt, const float *k, int64_t st, int64_t dim, vf *s) {     \
        const float *key[N];                                                               \
        vf acc[N];                                                                         \
        _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) {                             \
            key[c] = k + c * st;                                                           \
            acc[c] = splat(0.0f);                                                          \
        }                                                                                  \
        int64_t d = 0;                                                                     \
        for (; d + 8 <= dim; d += 8) {                                                     \
            _Pragma("GCC unroll 8") for (int dd = 0; dd < 8; ++dd) {                       \
                const vf qv = qt[d + dd];                                                  \
                _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) acc[c] += qv * key[c][d + dd]; \
            }                                                                              \
        }                                                                                  \
        for (; d < dim; ++d) {                                                             \
            const vf qv = qt[d];                                                           \
            _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) acc[c] += qv * key[c][d]; \
        }                                                                                  \
        _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) s[c] = acc[c];                \
    }

/* W output dimensions of P V over every key of the tile */
#define DEFINE_PV(W)                                                                          \
    static void pv_##W(const vf *p, const float *v, int64_t st, const int32_t *start,        \
                       const int32_t *len, int64_t segs, vf *o) {                             \
        vf acc[W];                                                                            \
        _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) acc[c] = splat(0.0f);            \
        for (int64_t g = 0; g < segs; ++g) {                                                  \
            const float *row = v + start[g] * st;                                             \
            for (int32_t n = 0; n < len[g]; ++n, ++p, row += st) {                            \
                const vf pn = *p;                                                             \
                _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) acc[c] += pn * row[c];   \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) o[c] = acc[c];                   \
    }

#define REPEAT_6(M) M(1) M(2) M(3) M(4) M(5) M(6)
#define REPEAT_16(M) REPEAT_6(M) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15) M(16)
#define ENTRY(N) qk_##N,
#define PV_ENTRY(W) pv_##W,

#define REPEAT_8(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8)
REPEAT_8(DEFINE_QK)
static void (*const QK[])(const vf *, const float *, int64_t, int64_t, vf *) = {
    0, REPEAT_8(ENTRY)};

#if DIM_CHUNK == 16
REPEAT_16(DEFINE_PV)
static void (*const PV[])(const vf *, const float *, int64_t, const int32_t *, const int32_t *,
                          int64_t, vf *) = {0, REPEAT_16(PV_ENTRY)};
#else
REPEAT_6(DEFINE_PV)
static void (*const PV[])(const vf *, const float *, int64_t, const int32_t *, const int32_t *,
                          int64_t, vf *) = {0, REPEAT_6(PV_ENTRY)};
#endif

static void tile(const struct problem *p, int64_t b, int64_t h, int64_t t, vf *qt, vf *s) {
    const int32_t *rows = p->rows + t * LANES;
    const int64_t kv = h / p->group;
    const int64_t dim = p->dim;
    const float scale = (float)p->scale_log2;

    /* the tile's queries, transposed: qt[d] holds dimension d of every lane */
    memset(qt, 0, sizeof(vf) * dim);
    float *qs = (float *)qt;
    for (int lane = 0; lane < LANES; ++lane) {
        if (rows[lane] < 0) continue;
        const float *src = p->q + b * p->q_sb + rows[lane] * p->q_st + h * p->q_sh;
        for (int64_t d = 0; d < dim; ++d) qs[d * LANES + lane] = src[d] * scale;
    }

    /* scores, segment by segment */
    const int64_t seg0 = p->seg_offsets[t], segs = p->seg_offsets[t + 1] - seg0;
    const int32_t *start = p->seg_start + seg0, *len = p->seg_len + seg0;
    const float *k = p->k + b * p->k_sb + kv * p->k_sh;
    int64_t keys = 0;
    for (int64_t g = 0; g < segs; ++g) {
        for (int32_t off = 0; off < len[g]; off += KEY_CHUNK) {
            const int32_t n = len[g] - off < KEY_CHUNK ? len[g] - off : KEY_CHUNK;
            QK[n](qt, k + (start[g] + off) * p->k_st, p->k_st, dim, s + keys);
            keys += n;
        }
    }

    /* hidden keys -> -inf, then the softmax over every key */
    const vf neg_inf = splat(-INFINITY);
    if (p->bit_offsets[t] >= 0) {
        const int32_t *bits = p->bits + p->bit_offsets[t] + h * p->bits_head_stride;
        vi lane_bit;
        for (int lane = 0; lane < LANES; ++lane) lane_bit[lane] = 1 << lane;
        for (int64_t n = 0; n < keys; ++n) {
            vi seen = ((vi){0} + bits[n]) & lane_bit;
            s[n] = select_bits(seen != 0, s[n], neg_inf);
        }
    }
    vf m = neg_inf;
    for (int64_t n = 0; n < keys; ++n) m = select_bits(s[n] > m, s[n], m);
    const vf m_safe = select_bits(m == neg_inf, splat(0.0f), m);
    vf l = splat(0.0f);
    for (int64_t n = 0; n < keys; ++n) {
        s[n] = exp2_vec(s[n] - m_safe);
        l += s[n];
    }
    vf inv_l;
    for (int lane = 0; lane < LANES; ++lane) inv_l[lane] = l[lane] > 0 ? 1.0f / l[lane] : 0.0f;

    /* out = P V / l, DIM_CHUNK dimensions at a time */
    const float *v = p->v + b * p->v_sb + kv * p->v_sh;
    vf o[DIM_CHUNK];
    for (int64_t d0 = 0; d0 < p->dim_v; d0 += DIM_CHUNK) {
        const int w = p->dim_v - d0 < DIM_CHUNK ? (int)(p->dim_v - d0) : DIM_CHUNK;
        PV[w](s, v + d0, p->v_st, start, len, segs, o);
        for (int c = 0; c < w; ++c) o[c] *= inv_l;
        for (int lane = 0; lane < LANES; ++lane) {
            if (rows[lane] < 0) continue;
            float *dst = p->out + b * p->o_sb + rows[lane] * p->o_st + h * p->o_sh + d0;
            for (int c = 0; c < w; ++c) dst[c] = o[c][lane];
        }
    }
    for (int lane = 0; lane < LANES; ++lane) {
        if (rows[lane] < 0) continue;
        p->lse[b * p->l_sb + h * p->l_sh + rows[lane]] =
            l[lane] > 0 ? (m_safe[lane] + log2f(l[lane])) * 0.69314718055994531f : -INFINITY;
    }
}

static int run_items(const struct problem *p, int64_t begin, int64_t end) {
    const size_t qt_bytes = sizeof(vf) * (size_t)p->dim;
    const size_t s_bytes = sizeof(vf) * (size_t)(p->max_keys > 0 ? p->max_keys : 1);
    vf *qt = aligned_alloc(sizeof(vf), qt_bytes);
    vf *s = aligned_alloc(sizeof(vf), s_bytes);
    if (!qt || !s) {
        free(qt);
        free(s);
        return -1;
    }
    for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item % p->tiles;
        const int64_t h = (item / p->tiles) % p->heads;
        const int64_t b = item / (p->tiles * p->heads);
        tile(p, b, h, t, qt, s);
    }
    free(qt);
    free(s);
    return 0;
}

/* All work items (batch x heads x tiles, tile fastest) on `threads` OpenMP threads: built with
 * -fopenmp this is the OpenMP runtime PyTorch already runs (same soname), so its workers take
 * the items instead of spinning beside other threads. Returns 0, or -1 when scratch memory could
 * not be allocated. */
int headwise_tiles_forward(const struct problem *p, int64_t items, int threads) {
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
        failed |= run_items(p, items * i / n, items * (i + 1) / n);
    }
#else
    (void)threads;
    failed = run_items(p, 0, items);
#endif
    return failed;
}

/* Items [begin, end) on the calling thread, for builds without OpenMP (tiles.py then splits
 * the items among Python threads; ctypes releases the GIL). */
int headwise_tiles_forward_range(const struct problem *p, int64_t begin, int64_t end) {
    return run_items(p, begin, end);
}

int headwise_tiles_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int headwise_tiles_lanes(void) { return LANES; }
