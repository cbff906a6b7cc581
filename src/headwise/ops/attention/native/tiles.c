/* Exact softmax attention, forward and backward, for tiles of up to LANES queries, in plain C
 * with vector extensions. headwise compiles this file on first use (build.py).
 *
 * A tile's queries sit in the lanes of one vector; its keys are runs ("segments") of consecutive
 * positions; a key entry may carry a bit per lane saying which of the tile's queries see it.
 * Every key costs one broadcast FMA per head dimension for all lanes at once:
 *
 *   forward   S[n] = scale log2(e) q . k_n,  P[n] = 2^(S[n] - max S),  l = sum P,
 *             O = sum_n P[n] v_n / l,  lse = ln 2 (max S + log2 l)   (natural log; -inf if empty)
 *   backward  P[n] = 2^(S[n] - log2(e) lse),  dP[n] = dO . v_n,  D = rowsum(dO * O) - dlse,
 *             dS[n] = P[n] (dP[n] - D),  dQ = scale sum_n dS[n] k_n,
 *             dK[n] += scale sum_lanes dS[n] q,  dV[n] += sum_lanes P[n] dO
 *
 * The K, V (and dO) rows are read in place, each key through its own pointer at constant
 * displacements (KEY_CHUNK keys, KEY_CHUNK accumulators), so nothing is packed per tile and a
 * tile can be small (4 x 4 on a 2-D grid) without losing efficiency: a query costs the keys of
 * its tile's union, where a block of a fused attention kernel costs the union of a larger group.
 * A tile's q and dO rows become lane vectors, and its O and dQ lanes become rows again, a
 * LANES x LANES block at a time through an in-register transpose (transpose_block), so rows are
 * read and written a vector at a time.
 *
 * q, k, v, out and dO may be bfloat16 or float16 (struct problem's dtype): elements are widened
 * to float32 as they are read (q and dO rows per tile; K and V rows the first time a thread reads
 * them for a (batch, K/V head), into its row cache) and out is rounded to nearest even as it is
 * written, so the arithmetic is float32 throughout and nothing is copied in full. Gradients of
 * that dtype are rounded once: dQ as it is written, dK and dV after a backward unit has summed
 * them in float32 (the unit owns its K/V head's rows, so no atomics are needed).
 *
 * Attention dropout (dropout_spec.md), when asked for, scales each kept probability by 1/(1-p)
 * after normalization (lse stays the undropped one): O = sum_n P[n] Z[n] v_n / (1-p), and the
 * backward pass regenerates Z from the counter instead of storing it:
 *             dP'[n] = Z[n] dP[n] / (1-p),  dS[n] = P[n] (dP'[n] - D),  dV[n] += P[n] Z[n] dO / (1-p)
 *
 * Work is split over PyTorch's OpenMP runtime when built with -fopenmp (same libgomp.so.1 soname,
 * so it is the runtime already loaded): forward items are (batch, head, tile); backward units are
 * (batch, K/V head) so that no two threads add into the same dK, dV rows. Threads take ranges of
 * items as they go (guided self-scheduling, claim()), not an even split fixed in advance.
 */
#include <float.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One vector register of floats per tile (32 registers of 16 with AVX-512; else 8 floats, one
 * AVX2 register or two NEON ones): KEY_CHUNK + 1 and DIM_CHUNK + 1 vectors stay in registers. */
#if defined(__AVX512F__)
#define LANES 16
#define DIM_CHUNK 16
#else
#define LANES 8
#define DIM_CHUNK 8
#endif
#define KEY_CHUNK 8
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu32 __attribute__((vector_size(4 * LANES)));

/* the tiles of one pattern (plan.py: TilePlan) */
struct plan {
    int64_t tiles;
    const int32_t *rows;        /* [tiles][LANES] query positions, -1: empty lane */
    const int64_t *seg_offsets; /* [tiles + 1] into seg_start / seg_len */
    const int32_t *seg_start, *seg_len;
    const int64_t *bit_offsets; /* [tiles] into bits (key entries in segment order); -1: none */
    const int32_t *bits;        /* lane bits per key entry, per head of the pattern */
    int64_t bits_head_stride;   /* 0 when every head shares the pattern */
    const int64_t *key_offsets; /* [tiles + 1] the tile's first key entry, then the total */
    const int32_t *rpb_index;   /* [entries][LANES] index into a head's bias table, or NULL */
};

/* q, k, v, out and dout hold elements of the call's dtype (the void pointers); every other
 * tensor is float32 */
struct problem {
    const void *q; int64_t q_sb, q_st, q_sh;           /* [b, t, h, d], d contiguous */
    const void *k; int64_t k_sb, k_st, k_sh;           /* [b, t, kv, d] */
    const void *v; int64_t v_sb, v_st, v_sh;           /* [b, t, kv, d] */
    void *out; int64_t o_sb, o_st, o_sh;               /* [b, t, h, d] (read in backward) */
    float *lse; int64_t l_sb, l_sh;                    /* [b, h, t] (read in backward) */
    const void *dout; int64_t do_sb, do_st, do_sh;     /* [b, t, h, d] backward only */
    const float *dlse; int64_t dl_sb, dl_sh;           /* [b, h, t] or NULL */
    void *dq; int64_t dq_sb, dq_st, dq_sh;             /* [b, t, h, d] written */
    void *dk; int64_t dk_sb, dk_st, dk_sh;             /* [b, t, kv, d] added to */
    void *dv; int64_t dv_sb, dv_st, dv_sh;             /* [b, t, kv, d] added to */
    int64_t batch, group, dim, dim_v;                  /* group: query heads per K/V head */
    const int32_t *heads; int64_t n_heads;             /* the query heads to process */
    const int32_t *head_plan, *head_rank;              /* per head: its plan, its head there */
    const int64_t *tile_offsets;                       /* [n_heads + 1]: forward items per b */
    const int64_t *unit_offsets; const int32_t *unit_heads; int64_t n_units;
    /* backward units: K/V head j of the call covers heads[unit_heads[unit_offsets[j]..]] */
    double scale;
    int64_t max_keys;
    const struct plan *plans;
    const float *rpb; int64_t rpb_sh;  /* relative-position bias table per head, or NULL */
    float *drpb; int64_t drpb_sb;      /* its gradient, one copy per batch, or NULL */
    const float *bias; int64_t bias_sb, bias_sh, bias_sq, bias_sk; /* additive, or NULL */
    int64_t long_keys; /* forward: tiles seeing more keys go through forward_group (0: never) */
    int64_t dtype;      /* of q, k, v, out, dout: DTYPE_F32, DTYPE_BF16 or DTYPE_F16 */
    int64_t grad_dtype; /* of dq, dk, dv: DTYPE_F32 or dtype */
    int64_t kv_len;    /* rows of k and v */
    /* attention dropout when dropout != 0: element (b, h, i, j) has the counter
     * ((b all_heads + h) q_len + i) kv_len + j, is kept iff its draw >= threshold (of 2^24), and
     * then weighs keep_scale = 1 / (1 - p) */
    int64_t dropout, threshold, all_heads, q_len;
    uint64_t seed;
    double keep_scale;
};

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

#define LOG2E 1.4426950408889634f
#define LN2 0.69314718055994531f

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf select_bits(vi keep, vf a, vf b) {
    return (vf)(((vi)a & keep) | ((vi)b & ~keep));
}

/* Half-precision elements. bfloat16 is the top half of a float32 (widening is a shift; narrowing
 * rounds to nearest even, NaN stays a quiet NaN). float16 by its bits, without the compiler's
 * _Float16, so any C11 compiler builds this file: widening is exact (subnormals included);
 * narrowing rounds to nearest even (F. Giesen's float_to_half_fast3_rtne), overflow to inf. */
static inline float bits_float(uint32_t x) {
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline uint32_t float_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

static inline float bf16_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

static inline float f16_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return bits_float(sign | 0x7f800000u | man << 13); /* inf, NaN */
    if (exp) return bits_float(sign | (exp + 112) << 23 | man << 13);  /* 127 - 15 = 112 */
    const float tiny = (float)man * 0x1p-24f;                          /* subnormal, zero */
    return sign ? -tiny : tiny;
}

static inline uint16_t float_to_f16(float f) {
    uint32_t x = float_bits(f);
    const uint32_t sign = x & 0x80000000u;
    uint16_t h;
    x ^= sign;
    if (x >= (127u + 16) << 23) { /* |f| >= 2^16: inf, or NaN */
        h = x > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (x < 113u << 23) { /* below 2^-14: subnormal or zero, rounded by a float add */
        const uint32_t magic = ((127u - 15) + (23 - 10) + 1) << 23;
        h = (uint16_t)(float_bits(bits_float(x) + bits_float(magic)) - magic);
    } else {
        x += ((uint32_t)(15 - 127) << 23) + 0xfff + ((x >> 13) & 1);
        h = (uint16_t)(x >> 13);
    }
    return (uint16_t)(h | sign >> 16);
}

/* dst[i * dst_st] = scale * src[i] for n elements of type dtype */
static void load_row(float *dst, int64_t dst_st, const void *src, int64_t n, int64_t dtype,
                     float scale) {
    if (dtype == DTYPE_F32) {
        const float *x = src;
        for (int64_t i = 0; i < n; ++i) dst[i * dst_st] = x[i] * scale;
    } else if (dtype == DTYPE_BF16) {
        const uint16_t *x = src;
        for (int64_t i = 0; i < n; ++i) dst[i * dst_st] = bf16_to_float(x[i]) * scale;
    } else {
        const uint16_t *x = src;
        for (int64_t i = 0; i < n; ++i) dst[i * dst_st] = f16_to_float(x[i]) * scale;
    }
}

/* dst[i] = scale * src[i * src_st] for n elements, dst of type dtype */
static void store_row(void *dst, const float *src, int64_t src_st, int64_t n, int64_t dtype,
                      float scale) {
    if (dtype == DTYPE_F32) {
        float *x = dst;
        for (int64_t i = 0; i < n; ++i) x[i] = src[i * src_st] * scale;
    } else if (dtype == DTYPE_BF16) {
        uint16_t *x = dst;
        for (int64_t i = 0; i < n; ++i) x[i] = float_to_bf16(src[i * src_st] * scale);
    } else {
        uint16_t *x = dst;
        for (int64_t i = 0; i < n; ++i) x[i] = float_to_f16(src[i * src_st] * scale);
    }
}

/* element `offset` of a tensor of the call's dtype; of the gradients' dtype */
static inline const void *elem(const struct problem *p, const void *base, int64_t offset) {
    return (const char *)base + offset * (p->dtype == DTYPE_F32 ? 4 : 2);
}

static inline void *grad_elem(const struct problem *p, void *base, int64_t offset) {
    return (char *)base + offset * (p->grad_dtype == DTYPE_F32 ? 4 : 2);
}

/* 2^x for x <= 0 (exactly 0 below -126, -inf included): 2^round(x) times a degree-7 Taylor
 * polynomial of 2^f on [-1/2, 1/2] (relative error < 1e-8 before rounding). */
static inline vf exp2_vec(vf x) {
    vi underflow = x < splat(-126.0f);
    x = select_bits(underflow, splat(-126.0f), x);
    vf r = (x + splat(12582912.0f)) - splat(12582912.0f); /* round to nearest */
    vf f = (x - r) * splat(LN2);
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

/* a hint to bring the cache line at `at` in (for writing when `write`); never faults. x86 gets
 * the instructions themselves: GCC 12 left no __builtin_prefetch of these loops in the built
 * library from -O1 on. */
static inline void prefetch(const char *at, int write) {
#if defined(__x86_64__) || defined(__i386__)
    if (write)
        __asm__ volatile("prefetchw %0" : : "m"(*at));
    else
        __asm__ volatile("prefetcht0 %0" : : "m"(*at));
#else
    __builtin_prefetch(at, write, 3);
#endif
}

/* s[c] = sum_d xt[d] * rows[c][d] for N rows at stride st: N accumulators, one broadcast FMA per
 * row and dimension, each row through its own pointer at constant displacements */
#define DEFINE_DOT(N)                                                                     \
    static void dot_##N(const vf *xt, const float *rows, int64_t st, int64_t dim, vf *s) { \
        const float *row[N];                                                              \
        vf acc[N];                                                                        \
        _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) {                            \
            row[c] = rows + c * st;                                                       \
            acc[c] = splat(0.0f);                                                         \
        }                                                                                 \
        int64_t d = 0;                                                                    \
        for (; d + 8 <= dim; d += 8) {                                                    \
            _Pragma("GCC unroll 8") for (int dd = 0; dd < 8; ++dd) {                      \
                const vf x = xt[d + dd];                                                  \
                _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c)                      \
                    acc[c] += x * row[c][d + dd];                                         \
            }                                                                             \
        }                                                                                 \
        for (; d < dim; ++d) {                                                            \
            const vf x = xt[d];                                                           \
            _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) acc[c] += x * row[c][d]; \
        }                                                                                 \
        _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) s[c] = acc[c];               \
    }

/* o[c] += sum over the keys n of segments start/len of p[n] * rows[n][c], for W columns (one
 * vector per column, lanes = the tile's queries) */
#define DEFINE_MIX(W)                                                                         \
    static void mix_##W(const vf *p, const float *rows, int64_t st, const int32_t *start,    \
                        const int32_t *len, int64_t segs, vf *o) {                            \
        vf acc[W];                                                                            \
        _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) acc[c] = o[c];                   \
        for (int64_t g = 0; g < segs; ++g) {                                                  \
            const float *row = rows + start[g] * st;                                          \
            for (int32_t n = 0; n < len[g]; ++n, ++p, row += st) {                            \
                const vf pn = *p;                                                             \
                if (n + KEY_CHUNK < len[g]) prefetch((const char *)(row + KEY_CHUNK * st), 0);  \
                _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) acc[c] += pn * row[c];   \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 32") for (int c = 0; c < W; ++c) o[c] = acc[c];                   \
    }

/* dst[c][:width] += scale * sum_lanes coef[c][lane] * rows[lane][:width] for N rows of dst at
 * stride st; rows: LANES rows of ld floats (ld a multiple of LANES, zero padded) */
#define DEFINE_OUTER(N)                                                                      \
    static void outer_##N(const float *rows, int64_t ld, const vf *coef, float *dst,        \
                          int64_t st, int64_t width, float scale) {                          \
        const float *cf = (const float *)coef;                                               \
        for (int64_t d0 = 0; d0 < width; d0 += LANES) {                                      \
            vf acc[N];                                                                       \
            _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c) acc[c] = splat(0.0f);       \
            _Pragma("GCC unroll 16") for (int lane = 0; lane < LANES; ++lane) {              \
                const vf x = *(const vf *)(rows + lane * ld + d0);                           \
                _Pragma("GCC unroll 16") for (int c = 0; c < N; ++c)                         \
                    acc[c] += x * cf[c * LANES + lane];                                      \
            }                                                                                \
            const int64_t w = width - d0 < LANES ? width - d0 : LANES;                       \
            for (int c = 0; c < N; ++c) {                                                    \
                float *out = dst + c * st + d0;                                              \
                if (w == LANES) {                                                            \
                    vf cur;                                                                  \
                    memcpy(&cur, out, sizeof cur);                                           \
                    cur += acc[c] * scale;                                                   \
                    memcpy(out, &cur, sizeof cur);                                           \
                } else {                                                                     \
                    for (int64_t i = 0; i < w; ++i) out[i] += acc[c][i] * scale;             \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }

#define REPEAT_8(M) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8)
#define REPEAT_16(M) REPEAT_8(M) M(9) M(10) M(11) M(12) M(13) M(14) M(15) M(16)
#define DOT_ENTRY(N) dot_##N,
#define MIX_ENTRY(W) mix_##W,
#define OUTER_ENTRY(N) outer_##N,

typedef void (*dot_fn)(const vf *, const float *, int64_t, int64_t, vf *);
typedef void (*mix_fn)(const vf *, const float *, int64_t, const int32_t *, const int32_t *,
                       int64_t, vf *);
typedef void (*outer_fn)(const float *, int64_t, const vf *, float *, int64_t, int64_t, float);

REPEAT_8(DEFINE_DOT)
REPEAT_8(DEFINE_OUTER)
static const dot_fn DOT[] = {0, REPEAT_8(DOT_ENTRY)};
static const outer_fn OUTER[] = {0, REPEAT_8(OUTER_ENTRY)};
#if DIM_CHUNK == 16
REPEAT_16(DEFINE_MIX)
static const mix_fn MIX[] = {0, REPEAT_16(MIX_ENTRY)};
#else
REPEAT_8(DEFINE_MIX)
static const mix_fn MIX[] = {0, REPEAT_8(MIX_ENTRY)};
#endif

/* forward_group: tiles taken together, and keys per chunk they share */
#define GROUP_TILES 8
#define CHUNK_KEYS 256

/* per-thread scratch */
struct scratch {
    vf *xt;     /* a tile's q (then dO) transposed: [dim][lanes] */
    vf *s, *ds; /* per key: scores / probabilities, dP / dS */
    float *q_rows, *do_rows; /* [LANES][ld]: a tile's q and dO rows, zero padded */
    float *o_row;            /* [dim_v]: one row of O */
    int64_t ld_q, ld_do;
    /* forward_group: GROUP_TILES tiles' q (transposed) and output accumulators, one chunk's
     * scores and key runs */
    vf *group_xt, *group_o, *chunk_s;
    int32_t *chunk_start, *chunk_len;
    vf *z; /* dropout: per key, 1/(1-p) in the lanes that keep it, else 0 */
    const char **lines; /* tile_forward's prefetch hints: cache lines of q and out rows */
    /* half-precision calls: the row cache, K and V rows widened to float32 at their key
     * positions ([kv_len][dim], [kv_len][dim_v]); cached[j]: the (batch, K/V head) tag of
     * row j's contents (0: none) */
    float *k_rows, *v_rows;
    int64_t *cached;
    /* half-precision gradients: a backward unit's dK, dV sums in float32 ([kv_len][dim],
     * [kv_len][dim_v]), added into dk, dv once the unit is done */
    float *dk_sum, *dv_sum;
};

/* where a backward unit adds dK and dV: the gradients themselves, or the float32 sums */
struct grad_rows {
    float *dk, *dv;
    int64_t dk_st, dv_st;
};

static int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* the entries add_lines makes for a row of n elements of the call's dtype */
static int64_t row_lines(const struct problem *p, int64_t n) {
    return (n * (p->dtype == DTYPE_F32 ? 4 : 2) + 63) / 64 + 1;
}

/* the most prefetch hints of a tile: LANES q rows and LANES out rows */
static int64_t max_lines(const struct problem *p) {
    return LANES * (row_lines(p, p->dim) + row_lines(p, p->dim_v));
}

static int scratch_init(struct scratch *w, const struct problem *p, int backward) {
    const int64_t dim = p->dim > p->dim_v ? p->dim : p->dim_v;
    const size_t keys = (size_t)(p->max_keys > 0 ? p->max_keys : 1);
    memset(w, 0, sizeof *w);
    w->ld_q = padded(p->dim);
    w->ld_do = padded(p->dim_v);
    w->xt = aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)dim);
    w->s = aligned_alloc(sizeof(vf), sizeof(vf) * keys);
    if (!backward && p->long_keys > 0) {
        w->group_xt = aligned_alloc(sizeof(vf), sizeof(vf) * GROUP_TILES * (size_t)p->dim);
        w->group_o = aligned_alloc(sizeof(vf), sizeof(vf) * GROUP_TILES * (size_t)p->dim_v);
        w->chunk_s = aligned_alloc(sizeof(vf), sizeof(vf) * CHUNK_KEYS);
        w->chunk_start = malloc(sizeof(int32_t) * CHUNK_KEYS);
        w->chunk_len = malloc(sizeof(int32_t) * CHUNK_KEYS);
        if (!w->group_xt || !w->group_o || !w->chunk_s || !w->chunk_start || !w->chunk_len)
            return -1;
    }
    if (backward) {
        w->ds = aligned_alloc(sizeof(vf), sizeof(vf) * keys);
        w->q_rows = aligned_alloc(sizeof(vf), sizeof(float) * LANES * (size_t)w->ld_q);
        w->do_rows = aligned_alloc(sizeof(vf), sizeof(float) * LANES * (size_t)w->ld_do);
        w->o_row = malloc(sizeof(float) * (size_t)dim); /* max(dim, dim_v) */
        if (!w->ds || !w->q_rows || !w->do_rows || !w->o_row) return -1;
    }
    if (!backward && !(w->lines = malloc(sizeof(char *) * (size_t)max_lines(p)))) return -1;
    if (p->dropout && !(w->z = aligned_alloc(sizeof(vf), sizeof(vf) * keys))) return -1;
    if (p->dtype != DTYPE_F32) {
        w->k_rows = malloc(sizeof(float) * (size_t)(p->kv_len * p->dim));
        w->v_rows = malloc(sizeof(float) * (size_t)(p->kv_len * p->dim_v));
        w->cached = calloc((size_t)p->kv_len, sizeof(int64_t));
        if (!w->k_rows || !w->v_rows || !w->cached) return -1;
    }
    if (backward && p->grad_dtype != DTYPE_F32) {
        w->dk_sum = malloc(sizeof(float) * (size_t)(p->kv_len * p->dim));
        w->dv_sum = malloc(sizeof(float) * (size_t)(p->kv_len * p->dim_v));
        if (!w->dk_sum || !w->dv_sum) return -1;
    }
    return w->xt && w->s ? 0 : -1;
}

static void scratch_free(struct scratch *w) {
    free(w->xt);
    free(w->s);
    free(w->ds);
    free(w->q_rows);
    free(w->do_rows);
    free(w->o_row);
    free(w->group_xt);
    free(w->group_o);
    free(w->chunk_s);
    free(w->chunk_start);
    free(w->chunk_len);
    free(w->z);
    free(w->lines);
    free(w->k_rows);
    free(w->v_rows);
    free(w->cached);
    free(w->dk_sum);
    free(w->dv_sum);
}

/* m[i][c] <- m[c][i]: the LANES x LANES block transposed in registers, log2(LANES) rounds of
 * two-source shuffles; round r (b = LANES / 2^(r+1)) swaps the off-diagonal b x b blocks of every
 * 2b x 2b block: rows i and i + b (i & b = 0) take columns SWAP_LO[r][c] = c & b ? LANES + c - b
 * : c and SWAP_HI[r][c] = c & b ? LANES + c : c + b of the pair (indices >= LANES: row i + b) */
#if LANES == 16
static const vi SWAP_LO[4] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
static const vi SWAP_HI[4] = {
    {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
    {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
#else
static const vi SWAP_LO[3] = {
    {0, 1, 2, 3, 8, 9, 10, 11},
    {0, 1, 8, 9, 4, 5, 12, 13},
    {0, 8, 2, 10, 4, 12, 6, 14}};
static const vi SWAP_HI[3] = {
    {4, 5, 6, 7, 12, 13, 14, 15},
    {2, 3, 10, 11, 6, 7, 14, 15},
    {1, 9, 3, 11, 5, 13, 7, 15}};
#endif

static inline void transpose_block(vf *m) {
    _Pragma("GCC unroll 4") for (int r = 0, b = LANES / 2; b >= 1; ++r, b /= 2) {
        _Pragma("GCC unroll 16") for (int i = 0; i < LANES; ++i) {
            if (i & b) continue;
            const vf a = m[i], x = m[i + b];
            m[i] = __builtin_shuffle(a, x, SWAP_LO[r]);
            m[i + b] = __builtin_shuffle(a, x, SWAP_HI[r]);
        }
    }
}

/* LANES elements of dtype at src as floats times scale (load_row's values, a vector at once for
 * float32 and bfloat16) */
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
static inline vf load_vec(const void *src, int64_t dtype, float scale) {
    vf x;
    if (dtype == DTYPE_F32) {
        memcpy(&x, src, sizeof x);
    } else if (dtype == DTYPE_BF16) {
        vh h;
        memcpy(&h, src, sizeof h);
        x = (vf)(__builtin_convertvector(h, vi) << 16);
    } else {
        load_row((float *)&x, 1, src, LANES, dtype, 1.0f);
    }
    return x * scale;
}

/* store_row of LANES floats x * scale (float_to_bf16's rounding, a vector at once) */
static inline void store_vec(void *dst, vf x, int64_t dtype, float scale) {
    x *= scale;
    if (dtype == DTYPE_F32) {
        memcpy(dst, &x, sizeof x);
    } else if (dtype == DTYPE_BF16) {
        const vu32 bits = (vu32)x;
        const vu32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, nan = bits >> 16 | 0x40u;
        const vi is_nan = (vi)(bits & 0x7fffffffu) > 0x7f800000;
        const vi word = ((vi)nan & is_nan) | ((vi)rounded & ~is_nan);
        const vh h = __builtin_convertvector(word, vh);
        memcpy(dst, &h, sizeof h);
    } else {
        store_row(dst, (const float *)&x, 1, LANES, dtype, 1.0f);
    }
}

/* xt[d][lane] = scale * src[row_lane][d] (0 for empty lanes), src of the call's dtype: LANES
 * columns at a time, read as rows and transposed in registers */
static void transpose_rows(const struct problem *p, vf *xt, const void *base, int64_t st,
                           const int32_t *rows, int64_t dim, float scale) {
    for (int64_t d0 = 0; d0 < dim; d0 += LANES) {
        const int64_t n = dim - d0 < LANES ? dim - d0 : LANES;
        vf m[LANES];
        for (int lane = 0; lane < LANES; ++lane) {
            m[lane] = splat(0.0f);
            if (rows[lane] < 0) continue;
            const void *src = elem(p, base, rows[lane] * st + d0);
            if (n == LANES)
                m[lane] = load_vec(src, p->dtype, scale);
            else
                load_row((float *)(m + lane), 1, src, n, p->dtype, scale);
        }
        transpose_block(m);
        memcpy(xt + d0, m, sizeof(vf) * (size_t)n);
    }
}

/* out row of each non-empty lane, columns d0..d0+cols-1 (cols <= LANES): scale[lane] * o[c]
 * [lane], o transposed in registers so each row is written from consecutive floats */
static void store_lanes(void *base, int64_t dtype, int64_t b_at, int64_t st, const int32_t *rows,
                        const vf *o, int cols, vf scale) {
    vf m[LANES];
    for (int c = 0; c < LANES; ++c) m[c] = c < cols ? o[c] : splat(0.0f);
    transpose_block(m);
    const int64_t size = dtype == DTYPE_F32 ? 4 : 2;
    for (int lane = 0; lane < LANES; ++lane) {
        if (rows[lane] < 0) continue;
        void *dst = (char *)base + (b_at + rows[lane] * st) * size;
        if (cols == LANES)
            store_vec(dst, m[lane], dtype, scale[lane]);
        else
            store_row(dst, (const float *)(m + lane), 1, cols, dtype, scale[lane]);
    }
}

/* the tile's keys: s[n] = dot(xt, rows[n]) over every key of every segment */
static int64_t dot_keys(const vf *xt, const float *base, int64_t st, const int32_t *start,
                        const int32_t *len, int64_t segs, int64_t dim, vf *s) {
    int64_t keys = 0;
    for (int64_t g = 0; g < segs; ++g) {
        for (int32_t off = 0; off < len[g]; off += KEY_CHUNK) {
            const int32_t n = len[g] - off < KEY_CHUNK ? len[g] - off : KEY_CHUNK;
            /* the next chunk's rows while this one's FMAs run (a row's first line: the
             * hardware brings the lines after it, and more hints measured slower) */
            const int32_t ahead = len[g] - off - n < KEY_CHUNK ? len[g] - off - n : KEY_CHUNK;
            for (int32_t c = 0; c < ahead; ++c)
                prefetch((const char *)(base + (start[g] + off + n + c) * st), 0);
            DOT[n](xt, base + (start[g] + off) * st, st, dim, s + keys);
            keys += n;
        }
    }
    return keys;
}

/* hidden keys -> -inf */
static void apply_bits(const struct plan *plan, int64_t rank, int64_t t, int64_t first, vf *s,
                       int64_t keys) {
    if (plan->bit_offsets[t] < 0) return;
    const int32_t *bits =
        plan->bits + plan->bit_offsets[t] + rank * plan->bits_head_stride + first;
    vi lane_bit;
    for (int lane = 0; lane < LANES; ++lane) lane_bit[lane] = 1 << lane;
    for (int64_t n = 0; n < keys; ++n) {
        vi seen = ((vi){0} + bits[n]) & lane_bit;
        s[n] = select_bits(seen != 0, s[n], splat(-INFINITY));
    }
}

/* what one work item (batch b, head heads[hs], tile t) reads */
struct item {
    const int32_t *rows, *start, *len; /* the tile's queries; its key segments */
    int64_t b, h, segs;
    const void *q;                     /* the head's q rows at position 0 (the call's dtype) */
    const float *k, *v;                /* its K, V rows at position 0, float32 */
    int64_t k_st, v_st;                /* ... at these strides */
    int64_t first;                     /* tile entry of start[0] (a chunk of the tile's keys) */
};

/* The item's K and V as float32 rows indexed by key position: in place for float32 inputs;
 * else in the thread's row cache, where the tile's rows not yet there for this (batch, K/V head)
 * are widened now. A thread's items run through the tiles of one head after another, so each
 * row is widened about once per thread and head group, and only rows some tile reads are. */
static struct item item_at(const struct problem *p, int64_t b, int64_t hs, int64_t t,
                           struct scratch *w) {
    const struct plan *plan = p->plans + p->head_plan[hs];
    const int64_t h = p->heads[hs], kv = h / p->group, seg0 = plan->seg_offsets[t];
    struct item it = {
        .rows = plan->rows + t * LANES,
        .start = plan->seg_start + seg0,
        .len = plan->seg_len + seg0,
        .b = b,
        .h = h,
        .segs = plan->seg_offsets[t + 1] - seg0,
        .q = elem(p, p->q, b * p->q_sb + h * p->q_sh),
    };
    const void *k = elem(p, p->k, b * p->k_sb + kv * p->k_sh);
    const void *v = elem(p, p->v, b * p->v_sb + kv * p->v_sh);
    if (p->dtype == DTYPE_F32) {
        it.k = k, it.v = v, it.k_st = p->k_st, it.v_st = p->v_st;
        return it;
    }
    const int64_t tag = (b << 32 | kv) + 1;
    for (int64_t g = 0; g < it.segs; ++g) {
        for (int64_t j = it.start[g]; j < it.start[g] + it.len[g]; ++j) {
            if (w->cached[j] == tag) continue;
            load_row(w->k_rows + j * p->dim, 1, elem(p, k, j * p->k_st), p->dim, p->dtype, 1.0f);
            load_row(w->v_rows + j * p->dim_v, 1, elem(p, v, j * p->v_st), p->dim_v, p->dtype,
                     1.0f);
            w->cached[j] = tag;
        }
    }
    it.k = w->k_rows, it.v = w->v_rows, it.k_st = p->dim, it.v_st = p->dim_v;
    return it;
}

/* Attention dropout's factors for every key n of the item (its segments, in order):
 * z[n] = keep_scale in the lanes whose query keeps key n, else 0. The draw of element
 * (b, h, i, j) is SplitMix64's output function of its counter c (a pure function of the indices,
 * so neither the tiling nor the thread count changes the mask, and backward regenerates it):
 *
 *   c = ((b H + h) Lq + i) Lk + j,   z = seed + (c + 1) 0x9E3779B97F4A7C15,
 *   z = (z ^ z >> 30) 0xBF58476D1CE4E5B9,  z = (z ^ z >> 27) 0x94D049BB133111EB,  z ^= z >> 31,
 *   keep iff z >> 40 >= threshold                                    (all mod 2^64) */
typedef uint64_t vu __attribute__((vector_size(8 * LANES)));
static void dropout_factors(const struct problem *p, const struct item *it, vf *z) {
    vu row_base; /* c - j of each lane (row 0 for empty lanes: they are never written) */
    for (int lane = 0; lane < LANES; ++lane) {
        const int64_t i = it->rows[lane] < 0 ? 0 : it->rows[lane];
        row_base[lane] = (uint64_t)(((it->b * p->all_heads + it->h) * p->q_len + i) * p->kv_len);
    }
    const vu golden = (vu){0} + 0x9E3779B97F4A7C15u, seed = (vu){0} + p->seed;
    const vu threshold = (vu){0} + (uint64_t)p->threshold;
    const vf keep = splat((float)p->keep_scale), drop = splat(0.0f);
    int64_t n = 0;
    for (int64_t g = 0; g < it->segs; ++g) {
        for (int64_t j = it->start[g]; j < it->start[g] + it->len[g]; ++j, ++n) {
            vu x = seed + (row_base + (uint64_t)j + 1) * golden;
            x = (x ^ x >> 30) * 0xBF58476D1CE4E5B9u;
            x = (x ^ x >> 27) * 0x94D049BB133111EBu;
            x ^= x >> 31;
            z[n] = select_bits(__builtin_convertvector(x >> 40 >= threshold, vi), keep, drop);
        }
    }
}

/* s[n] += log2(e) bias[b, h, row, key]. A finite bias stays finite (clamped to -FLT_MAX: a row of
 * large negative biases, like transformers' finfo.min masks, is a uniform softmax as in PyTorch);
 * -inf stays -inf (hidden). */
static void add_bias(const struct problem *p, const struct item *it, vf *s) {
    int64_t row[LANES];
    for (int lane = 0; lane < LANES; ++lane)
        row[lane] = it->b * p->bias_sb + it->h * p->bias_sh +
                    (it->rows[lane] < 0 ? 0 : it->rows[lane]) * p->bias_sq;
    int64_t n = 0;
    for (int64_t g = 0; g < it->segs; ++g) {
        for (int32_t key = it->start[g]; key < it->start[g] + it->len[g]; ++key, ++n) {
            const float *column = p->bias + key * p->bias_sk;
            for (int lane = 0; lane < LANES; ++lane) {
                const float value = column[row[lane]];
                s[n][lane] += isinf(value) ? value : fmaxf(value * LOG2E, -FLT_MAX);
            }
        }
    }
}

/* s[n] = log2(e) (scale q . k_n + rpb + bias) for every key of the tile, hidden ones -inf; returns the
 * count */
static int64_t scores_of(const struct problem *p, int64_t hs, int64_t t, const struct item *it,
                         const vf *xt, vf *s) {
    const struct plan *plan = p->plans + p->head_plan[hs];
    const int64_t keys = dot_keys(xt, it->k, it->k_st, it->start, it->len, it->segs, p->dim, s);
    if (p->rpb && plan->rpb_index) {
        const int32_t *index = plan->rpb_index + (plan->key_offsets[t] + it->first) * LANES;
        const float *table = p->rpb + it->h * p->rpb_sh;
        for (int64_t n = 0; n < keys; ++n)
            for (int lane = 0; lane < LANES; ++lane)
                s[n][lane] += table[index[n * LANES + lane]] * LOG2E;
    }
    if (p->bias) add_bias(p, it, s);
    apply_bits(plan, p->head_rank[hs], t, it->first, s, keys);
    return keys;
}

static int64_t scores(const struct problem *p, int64_t hs, int64_t t, const struct item *it,
                      vf *s, vf *xt) {
    transpose_rows(p, xt, it->q, p->q_st, it->rows, p->dim, (float)p->scale * LOG2E);
    return scores_of(p, hs, t, it, xt, s);
}

/* max(m, s[0..keys-1]) per lane, NaNs ignored, in four running maxima: one chain through every
 * key waits on a compare and a select per key. Only which of +0 and -0 a zero maximum gets may
 * differ from one chain's (the first of the equal ones), and no result depends on that sign:
 * 2^(x - m) and ln 2 (m + log2 l) read the same for either. */
static inline vf max_scores(const vf *s, int64_t keys, vf m) {
    vf m1 = splat(-INFINITY), m2 = m1, m3 = m1;
    int64_t n = 0;
    for (; n + 4 <= keys; n += 4) {
        m = select_bits(s[n] > m, s[n], m);
        m1 = select_bits(s[n + 1] > m1, s[n + 1], m1);
        m2 = select_bits(s[n + 2] > m2, s[n + 2], m2);
        m3 = select_bits(s[n + 3] > m3, s[n + 3], m3);
    }
    for (; n < keys; ++n) m = select_bits(s[n] > m, s[n], m);
    m = select_bits(m1 > m, m1, m);
    m2 = select_bits(m3 > m2, m3, m2);
    return select_bits(m2 > m, m2, m);
}

/* the tile's lse: ln 2 (m + log2 l), -inf for a query that sees no key */
static void write_lse(const struct problem *p, const struct item *it, vf m_safe, vf l) {
    for (int lane = 0; lane < LANES; ++lane) {
        if (it->rows[lane] < 0) continue;
        p->lse[it->b * p->l_sb + it->h * p->l_sh + it->rows[lane]] =
            l[lane] > 0 ? (m_safe[lane] + log2f(l[lane])) * LN2 : -INFINITY;
    }
}

/* Tiles t0..t1-1 of one (batch, head) that each see more than long_keys keys, FlashAttention
 * style: the keys are taken in chunks of CHUNK_KEYS positions, every tile of the group scores
 * its keys of the chunk while that chunk's K and V rows are in cache, and keeps a running max m,
 * sum l and output O per lane, rescaled by 2^(m_old - m_new) when the max grows. A tile that
 * sees every key of a long sequence would otherwise stream all of K and V per 16 queries.
 * Chunks start at multiples of CHUNK_KEYS, so a tile's sums are the same whichever tiles a
 * thread's range groups it with (results do not depend on the thread count). */
static void forward_group(const struct problem *p, int64_t b, int64_t hs, int64_t t0, int64_t t1,
                          struct scratch *w) {
    struct item items[GROUP_TILES];
    vf m[GROUP_TILES], l[GROUP_TILES];
    int64_t seg[GROUP_TILES], entry[GROUP_TILES];
    int32_t off[GROUP_TILES];
    const int64_t tiles = t1 - t0, dim_v = p->dim_v;
    const vf neg_inf = splat(-INFINITY);
    for (int64_t j = 0; j < tiles; ++j) {
        items[j] = item_at(p, b, hs, t0 + j, w);
        transpose_rows(p, w->group_xt + j * p->dim, items[j].q, p->q_st, items[j].rows, p->dim,
                       (float)p->scale * LOG2E);
        memset(w->group_o + j * dim_v, 0, sizeof(vf) * (size_t)dim_v);
        m[j] = neg_inf;
        l[j] = splat(0.0f);
        seg[j] = entry[j] = 0;
        off[j] = 0;
    }
    for (;;) {
        /* the next chunk starts at the lowest key position a tile has not taken yet */
        int64_t c0 = INT64_MAX;
        for (int64_t j = 0; j < tiles; ++j)
            if (seg[j] < items[j].segs && items[j].start[seg[j]] + off[j] < c0)
                c0 = items[j].start[seg[j]] + off[j];
        if (c0 == INT64_MAX) break;
        c0 -= c0 % CHUNK_KEYS;
        const int64_t c1 = c0 + CHUNK_KEYS;
        for (int64_t j = 0; j < tiles; ++j) {
            const struct item *it = items + j;
            int64_t runs = 0, keys = 0;
            while (seg[j] < it->segs && it->start[seg[j]] + off[j] < c1) {
                const int64_t position = it->start[seg[j]] + off[j];
                const int32_t left = it->len[seg[j]] - off[j];
                const int32_t take = c1 - position < left ? (int32_t)(c1 - position) : left;
                w->chunk_start[runs] = (int32_t)position;
                w->chunk_len[runs++] = take;
                keys += take;
                off[j] += take;
                if (off[j] == it->len[seg[j]]) {
                    ++seg[j];
                    off[j] = 0;
                }
            }
            if (!keys) continue;
            struct item chunk = *it;
            chunk.start = w->chunk_start;
            chunk.len = w->chunk_len;
            chunk.segs = runs;
            chunk.first = entry[j];
            entry[j] += keys;
            vf *s = w->chunk_s;
            scores_of(p, hs, t0 + j, &chunk, w->group_xt + j * p->dim, s);
            const vf m_new = max_scores(s, keys, m[j]);
            const vf m_safe = select_bits(m_new == neg_inf, splat(0.0f), m_new);
            const vf alpha = exp2_vec(m[j] - m_safe); /* 0 while nothing was seen */
            vf sum = splat(0.0f);
            for (int64_t n = 0; n < keys; ++n) {
                s[n] = exp2_vec(s[n] - m_safe);
                sum += s[n];
            }
            l[j] = l[j] * alpha + sum;
            m[j] = m_new;
            if (p->dropout) { /* after the sum: l and lse are the undropped ones */
                dropout_factors(p, &chunk, w->z);
                for (int64_t n = 0; n < keys; ++n) s[n] *= w->z[n];
            }
            vf *o = w->group_o + j * dim_v;
            for (int64_t d = 0; d < dim_v; ++d) o[d] *= alpha;
            for (int64_t d0 = 0; d0 < dim_v; d0 += DIM_CHUNK) {
                const int cols = dim_v - d0 < DIM_CHUNK ? (int)(dim_v - d0) : DIM_CHUNK;
                MIX[cols](s, it->v + d0, it->v_st, chunk.start, chunk.len, runs, o + d0);
            }
        }
    }
    for (int64_t j = 0; j < tiles; ++j) {
        const struct item *it = items + j;
        const vf *o = w->group_o + j * dim_v;
        for (int lane = 0; lane < LANES; ++lane) {
            if (it->rows[lane] < 0) continue;
            const float inv_l = l[j][lane] > 0 ? 1.0f / l[j][lane] : 0.0f;
            const int64_t at = b * p->o_sb + it->rows[lane] * p->o_st + it->h * p->o_sh;
            store_row((void *)elem(p, p->out, at), (const float *)o + lane, LANES, dim_v,
                      p->dtype, inv_l);
        }
        write_lse(p, it, select_bits(m[j] == neg_inf, splat(0.0f), m[j]), l[j]);
    }
}

/* lines[count..]: the cache lines of the `bytes` bytes at `at` (the last one read from the last
 * byte: a row need not start on a line); returns the new count */
static int64_t add_lines(const char **lines, int64_t count, const char *at, int64_t bytes) {
    for (int64_t k = 0; k < bytes; k += 64) lines[count++] = at + k;
    if (bytes > 0) lines[count++] = at + bytes - 1;
    return count;
}

/* Where the rows a forward tile reads and writes outside its key loops lie: the q rows of tile
 * `next` of the head (the item a thread runs after this one, usually) and the out rows of tile
 * t, as the cache lines they touch, out's first (`*writes` of them). Those rows lie H x D
 * elements apart in (B, L, H, D), a stride the hardware prefetcher does not follow, and a fresh
 * batch's q and out are not in cache. Returns the count (at most max_lines). */
static int64_t tile_lines(const struct problem *p, int64_t b, int64_t hs, int64_t t, int64_t next,
                          const char **lines, int64_t *writes) {
    const struct plan *plan = p->plans + p->head_plan[hs];
    const int64_t h = p->heads[hs], size = p->dtype == DTYPE_F32 ? 4 : 2;
    const char *out = elem(p, p->out, b * p->o_sb + h * p->o_sh);
    const char *q = elem(p, p->q, b * p->q_sb + h * p->q_sh);
    int64_t count = 0;
    for (int lane = 0; lane < LANES; ++lane) {
        const int32_t row = plan->rows[t * LANES + lane];
        if (row >= 0)
            count = add_lines(lines, count, out + row * p->o_st * size, p->dim_v * size);
    }
    *writes = count;
    for (int lane = 0; lane < LANES && next < plan->tiles; ++lane) {
        const int32_t row = plan->rows[next * LANES + lane];
        if (row >= 0)
            count = add_lines(lines, count, q + row * p->q_st * size, p->dim * size);
    }
    return count;
}

static void tile_forward(const struct problem *p, int64_t b, int64_t hs, int64_t t,
                         struct scratch *w) {
    const struct item it = item_at(p, b, hs, t, w);
    const int64_t keys = scores(p, hs, t, &it, w->s, w->xt), h = it.h;
    const int32_t *rows = it.rows;
    vf *s = w->s;

    const vf neg_inf = splat(-INFINITY);
    const vf m = max_scores(s, keys, neg_inf);
    const vf m_safe = select_bits(m == neg_inf, splat(0.0f), m);
    /* the prefetch hints, one per key of the exp pass (a burst of them would stall on the
     * misses it starts); results do not change */
    int64_t writes;
    const int64_t lines = tile_lines(p, b, hs, t, t + 1, w->lines, &writes);
    vf l = splat(0.0f);
    for (int64_t n = 0; n < keys; ++n) {
        if (n < lines) prefetch(w->lines[n], n < writes);
        s[n] = exp2_vec(s[n] - m_safe);
        l += s[n];
    }
    for (int64_t n = keys; n < lines; ++n) prefetch(w->lines[n], n < writes);
    vf inv_l;
    for (int lane = 0; lane < LANES; ++lane) inv_l[lane] = l[lane] > 0 ? 1.0f / l[lane] : 0.0f;
    if (p->dropout) { /* after the sum: l and lse are the undropped ones */
        dropout_factors(p, &it, w->z);
        for (int64_t n = 0; n < keys; ++n) s[n] *= w->z[n];
    }

    vf o[DIM_CHUNK];
    for (int64_t d0 = 0; d0 < p->dim_v; d0 += DIM_CHUNK) {
        const int cols = p->dim_v - d0 < DIM_CHUNK ? (int)(p->dim_v - d0) : DIM_CHUNK;
        for (int c = 0; c < cols; ++c) o[c] = splat(0.0f);
        MIX[cols](s, it.v + d0, it.v_st, it.start, it.len, it.segs, o);
        store_lanes(p->out, p->dtype, b * p->o_sb + h * p->o_sh + d0, p->o_st, rows, o, cols,
                    inv_l);
    }
    write_lse(p, &it, m_safe, l);
}

static void tile_backward(const struct problem *p, int64_t b, int64_t hs, int64_t t,
                          struct scratch *w, const struct grad_rows *grad) {
    const struct item it = item_at(p, b, hs, t, w);
    const int32_t *rows = it.rows, *start = it.start, *len = it.len;
    const int64_t h = it.h, segs = it.segs;
    const float *k = it.k, *v = it.v;
    const void *dout = elem(p, p->dout, b * p->do_sb + h * p->do_sh);
    const float scale = (float)p->scale;
    vf *s = w->s, *ds = w->ds;

    /* per lane: log2-domain lse (+inf for empty rows: P = 0) and D = rowsum(dO * O) - dlse */
    vf lse2 = splat(INFINITY), delta = splat(0.0f);
    memset(w->q_rows, 0, sizeof(float) * LANES * (size_t)w->ld_q);
    memset(w->do_rows, 0, sizeof(float) * LANES * (size_t)w->ld_do);
    for (int lane = 0; lane < LANES; ++lane) {
        if (rows[lane] < 0) continue;
        const int64_t r = rows[lane];
        const float lse = p->lse[b * p->l_sb + h * p->l_sh + r];
        if (isinf(lse)) continue;
        lse2[lane] = lse * LOG2E;
        float *q_row = w->q_rows + lane * w->ld_q, *g = w->do_rows + lane * w->ld_do;
        load_row(q_row, 1, elem(p, it.q, r * p->q_st), p->dim, p->dtype, 1.0f);
        load_row(g, 1, elem(p, dout, r * p->do_st), p->dim_v, p->dtype, 1.0f);
        float *o = w->o_row;
        load_row(o, 1, elem(p, p->out, b * p->o_sb + r * p->o_st + h * p->o_sh), p->dim_v,
                 p->dtype, 1.0f);
        float sum = 0.0f;
        for (int64_t d = 0; d < p->dim_v; ++d) sum += g[d] * o[d];
        if (p->dlse) sum -= p->dlse[b * p->dl_sb + h * p->dl_sh + r];
        delta[lane] = sum;
    }

    /* P and dS for every key */
    const int64_t keys = scores(p, hs, t, &it, s, w->xt);
    transpose_rows(p, w->xt, dout, p->do_st, rows, p->dim_v, 1.0f);
    dot_keys(w->xt, v, it.v_st, start, len, segs, p->dim_v, ds);
    if (p->dropout) {
        /* the forward pass's mask, regenerated: dP' = Z dP / (1-p), and P Z / (1-p) into dV */
        dropout_factors(p, &it, w->z);
        for (int64_t n = 0; n < keys; ++n) {
            s[n] = exp2_vec(s[n] - lse2);
            ds[n] = s[n] * (ds[n] * w->z[n] - delta);
            s[n] *= w->z[n];
        }
    } else {
        for (int64_t n = 0; n < keys; ++n) {
            s[n] = exp2_vec(s[n] - lse2);
            ds[n] = s[n] * (ds[n] - delta);
        }
    }
    const struct plan *plan = p->plans + p->head_plan[hs];
    if (p->drpb && plan->rpb_index) {
        /* d rpb[index] += dS (hidden keys and empty lanes have dS = 0), in batch b's own copy:
         * one unit adds into it at a time, in tile order, whatever the thread count */
        const int32_t *index = plan->rpb_index + plan->key_offsets[t] * LANES;
        float *grad = p->drpb + b * p->drpb_sb + h * p->rpb_sh;
        for (int64_t n = 0; n < keys; ++n)
            for (int lane = 0; lane < LANES; ++lane) grad[index[n * LANES + lane]] += ds[n][lane];
    }

    /* dQ = scale dS K (each query row belongs to one tile: written, not added) */
    vf o[DIM_CHUNK];
    for (int64_t d0 = 0; d0 < p->dim; d0 += DIM_CHUNK) {
        const int cols = p->dim - d0 < DIM_CHUNK ? (int)(p->dim - d0) : DIM_CHUNK;
        for (int c = 0; c < cols; ++c) o[c] = splat(0.0f);
        MIX[cols](ds, k + d0, it.k_st, start, len, segs, o);
        store_lanes(p->dq, p->grad_dtype, b * p->dq_sb + h * p->dq_sh + d0, p->dq_st, rows, o,
                    cols, splat(scale));
    }

    /* dK += scale dS^T Q, dV += P^T dO, KEY_CHUNK keys at a time */
    float *dk = grad->dk, *dv = grad->dv;
    const int64_t dk_st = grad->dk_st, dv_st = grad->dv_st;
    int64_t n0 = 0;
    for (int64_t g = 0; g < segs; ++g) {
        for (int32_t off = 0; off < len[g]; off += KEY_CHUNK) {
            const int32_t n = len[g] - off < KEY_CHUNK ? len[g] - off : KEY_CHUNK;
            const int64_t key = start[g] + off;
            OUTER[n](w->q_rows, w->ld_q, ds + n0, dk + key * dk_st, dk_st, p->dim, scale);
            OUTER[n](w->do_rows, w->ld_do, s + n0, dv + key * dv_st, dv_st, p->dim_v, 1.0f);
            n0 += n;
        }
    }
}

static int64_t tile_keys(const struct problem *p, int64_t hs, int64_t t) {
    const struct plan *plan = p->plans + p->head_plan[hs];
    return plan->key_offsets[t + 1] - plan->key_offsets[t];
}

/* Forward items begin..end-1 ((batch, head, tile), tile fastest) with the thread's scratch */
static void forward_items(const struct problem *p, int64_t begin, int64_t end,
                          struct scratch *w) {
    const int64_t per_batch = p->tile_offsets[p->n_heads];
    int64_t hs = 0;
    for (int64_t item = begin; item < end;) {
        const int64_t b = item / per_batch, i = item % per_batch;
        if (i < p->tile_offsets[hs]) hs = 0;
        while (i >= p->tile_offsets[hs + 1]) ++hs;
        const int64_t t = i - p->tile_offsets[hs];
        /* consecutive long tiles of this (batch, head) within the range go together */
        int64_t t1 = t;
        while (p->long_keys > 0 && t1 - t < GROUP_TILES && item + (t1 - t) < end &&
               p->tile_offsets[hs] + t1 < p->tile_offsets[hs + 1] &&
               tile_keys(p, hs, t1) > p->long_keys)
            ++t1;
        if (t1 > t) {
            forward_group(p, b, hs, t, t1, w);
            item += t1 - t;
        } else {
            tile_forward(p, b, hs, t, w);
            ++item;
        }
    }
}

/* Forward items begin..end-1. Returns 0, or -1 when scratch memory could not be allocated. */
static int forward_range(const struct problem *p, int64_t begin, int64_t end) {
    struct scratch w;
    const int failed = scratch_init(&w, p, 0);
    if (!failed) forward_items(p, begin, end, &w);
    scratch_free(&w);
    return failed;
}

/* dk[j] = round(dk[j] + sum_dk[j]) (dv alike) for every row j of a unit's K/V head, gradients
 * of the call's half-precision dtype at element offsets dk_at, dv_at */
static void add_rounded(const struct problem *p, struct scratch *w, int64_t dk_at,
                        int64_t dv_at) {
    float *row = w->o_row; /* [max(dim, dim_v)] in a backward scratch */
    for (int64_t j = 0; j < p->kv_len; ++j) {
        void *dk = grad_elem(p, p->dk, dk_at + j * p->dk_st);
        void *dv = grad_elem(p, p->dv, dv_at + j * p->dv_st);
        const float *sum_k = w->dk_sum + j * p->dim, *sum_v = w->dv_sum + j * p->dim_v;
        load_row(row, 1, dk, p->dim, p->grad_dtype, 1.0f);
        for (int64_t d = 0; d < p->dim; ++d) row[d] += sum_k[d];
        store_row(dk, row, 1, p->dim, p->grad_dtype, 1.0f);
        load_row(row, 1, dv, p->dim_v, p->grad_dtype, 1.0f);
        for (int64_t d = 0; d < p->dim_v; ++d) row[d] += sum_v[d];
        store_row(dv, row, 1, p->dim_v, p->grad_dtype, 1.0f);
    }
}

/* Backward units begin..end-1 ((batch, K/V head)), each every tile of every query head sharing
 * that K/V head, so a unit's dK, dV rows are its own. */
static void backward_units(const struct problem *p, int64_t begin, int64_t end,
                           struct scratch *w) {
    const int half = p->grad_dtype != DTYPE_F32;
    for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / p->n_units, j = unit % p->n_units;
        const int64_t kv = p->heads[p->unit_heads[p->unit_offsets[j]]] / p->group;
        const int64_t dk_at = b * p->dk_sb + kv * p->dk_sh, dv_at = b * p->dv_sb + kv * p->dv_sh;
        struct grad_rows grad = {(float *)p->dk + dk_at, (float *)p->dv + dv_at, p->dk_st,
                                 p->dv_st};
        if (half) {
            grad = (struct grad_rows){w->dk_sum, w->dv_sum, p->dim, p->dim_v};
            memset(w->dk_sum, 0, sizeof(float) * (size_t)(p->kv_len * p->dim));
            memset(w->dv_sum, 0, sizeof(float) * (size_t)(p->kv_len * p->dim_v));
        }
        for (int64_t i = p->unit_offsets[j]; i < p->unit_offsets[j + 1]; ++i) {
            const int64_t hs = p->unit_heads[i];
            const int64_t tiles = p->plans[p->head_plan[hs]].tiles;
            for (int64_t t = 0; t < tiles; ++t) tile_backward(p, b, hs, t, w, &grad);
        }
        if (half) add_rounded(p, w, dk_at, dv_at);
    }
}

/* Backward units begin..end-1. Returns 0, or -1 when scratch memory could not be allocated. */
static int backward_range(const struct problem *p, int64_t begin, int64_t end) {
    struct scratch w;
    const int failed = scratch_init(&w, p, 1);
    if (!failed) backward_units(p, begin, end, &w);
    scratch_free(&w);
    return failed;
}

/* The next range of items for a thread to run, guided self-scheduling: a thread takes
 * max(min_size, remaining / (2 threads)) of the items still untaken, so the ranges shrink as the
 * work runs out and a thread the OS deschedules (a loaded machine) holds back only its current
 * range, where an even split would make every other thread wait at the end for its whole share.
 * Returns the range's size (0: none left) and its first item in *begin. Which thread runs an
 * item never changes its result: tiles and units are independent, and a forward group's sums
 * do not depend on the tiles grouped with it. */
static int64_t claim(int64_t *next, int64_t items, int64_t threads, int64_t min_size,
                     int64_t *begin) {
    int64_t first = __atomic_load_n(next, __ATOMIC_RELAXED), size;
    do {
        const int64_t left = items - first;
        if (left <= 0) return 0;
        size = left / (2 * threads);
        size = size < min_size ? min_size : size;
        size = size > left ? left : size;
    } while (!__atomic_compare_exchange_n(next, &first, first + size, 1, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    *begin = first;
    return size;
}

static int run(const struct problem *p, int backward, int64_t items, int threads) {
    int failed = 0;
#ifdef _OPENMP
    int64_t next = 0;
    /* forward ranges of at least a group of tiles, so long tiles still go together */
    const int64_t min_size = backward ? 1 : GROUP_TILES;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        struct scratch w;
        failed = scratch_init(&w, p, backward);
        const int64_t n = omp_get_num_threads();
        int64_t begin, size;
        while (!failed && (size = claim(&next, items, n, min_size, &begin)) > 0) {
            if (backward)
                backward_units(p, begin, begin + size, &w);
            else
                forward_items(p, begin, begin + size, &w);
        }
        scratch_free(&w);
    }
#else
    (void)threads;
    failed = backward ? backward_range(p, 0, items) : forward_range(p, 0, items);
#endif
    return failed;
}

/* Entry points. With OpenMP, `threads` threads of the runtime PyTorch already loaded; without,
 * the *_range entries let call.py split the items among Python threads (ctypes releases the
 * GIL). Each returns 0, or -1 when scratch memory could not be allocated. */
int headwise_tiles_forward(const struct problem *p, int threads) {
    return run(p, 0, p->batch * p->tile_offsets[p->n_heads], threads);
}

int headwise_tiles_backward(const struct problem *p, int threads) {
    return run(p, 1, p->batch * p->n_units, threads);
}

int headwise_tiles_forward_range(const struct problem *p, int64_t begin, int64_t end) {
    return forward_range(p, begin, end);
}

int headwise_tiles_backward_range(const struct problem *p, int64_t begin, int64_t end) {
    return backward_range(p, begin, end);
}

/* whether one of n elements at stride st has all its exponent bits set (inf or NaN): float32
 * bits, or the 16-bit words of bfloat16 and float16 with their exponent field `field` (plain
 * loops that the compiler vectorizes: an OR per element, no early exit) */
static int any_bad_32(const uint32_t *x, int64_t n, int64_t st) {
    uint32_t bad = 0;
    if (st == 1)
        for (int64_t i = 0; i < n; ++i) bad |= (x[i] & 0x7f800000u) == 0x7f800000u;
    else
        for (int64_t i = 0; i < n; ++i) bad |= (x[i * st] & 0x7f800000u) == 0x7f800000u;
    return bad != 0;
}

static int any_bad_16(const uint16_t *x, int64_t n, int64_t st, uint16_t field) {
    uint16_t bad = 0;
    if (st == 1)
        for (int64_t i = 0; i < n; ++i) bad |= (x[i] & field) == field;
    else
        for (int64_t i = 0; i < n; ++i) bad |= (x[i * st] & field) == field;
    return bad != 0;
}

/* 1 when every element of the 4-D tensor at base (sizes n0..n3, element strides s0..s3, of the
 * dtype codes of struct problem) is finite, else 0: by the bits, no exponent field all ones
 * (0x7f800000 in float32, 0x7f80 in bfloat16, 0x7c00 in float16), no copy; dims contiguous with
 * the next inner one are read as one run. The screen of the non-finite rule (nonfinite.py) for
 * the native operators. */
int headwise_all_finite(const void *base, int64_t dtype, int64_t n0, int64_t n1, int64_t n2,
                        int64_t n3, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
    int64_t n[4] = {n0, n1, n2, n3}, s[4] = {s0, s1, s2, s3};
    for (int d = 0; d < 4; ++d)
        if (n[d] == 0) return 1;
    for (int inner = 3; inner > 0 && (n[inner - 1] == 1 || s[inner - 1] == s[3] * n[3]);) {
        n[3] *= n[inner - 1]; /* n[inner - 1..3] read as one run */
        n[--inner] = 1;
    }
    const uint16_t field = dtype == DTYPE_BF16 ? 0x7f80 : 0x7c00;
    for (int64_t i0 = 0; i0 < n[0]; ++i0)
        for (int64_t i1 = 0; i1 < n[1]; ++i1)
            for (int64_t i2 = 0; i2 < n[2]; ++i2) {
                const int64_t at = i0 * s[0] + i1 * s[1] + i2 * s[2];
                const int bad = dtype == DTYPE_F32
                                    ? any_bad_32((const uint32_t *)base + at, n[3], s[3])
                                    : any_bad_16((const uint16_t *)base + at, n[3], s[3], field);
                if (bad) return 0;
            }
    return 1;
}

int headwise_tiles_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int headwise_tiles_lanes(void) { return LANES; }
