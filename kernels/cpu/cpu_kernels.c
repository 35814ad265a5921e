/* CPU kernels for decode steps (a few tokens at a time), compiled at first use by __init__.py (package smolvlm_cpu_kernels):
 *     smolvlm_matvec                   y (M, N) = x (M, K) @ w (N, K)^T, M small   (the weight products)
 *     smolvlm_matvec_q8                the same with int8 weights, one fp32 scale per group of 32 (int8 mode)
 *     smolvlm_rms_norm                 the decoder's RMSNorm, in one call
 *     smolvlm_store_kv                 new K/V rows into their paged-cache slots
 *     smolvlm_paged_decode_attention   one query per sequence over its paged context
 * Each has a PyTorch reference it is tested against (tests/test_cpu_kernels.py).
 *
 * Why: a decode step multiplies a token's activations by every weight matrix, so its time is the
 * time to stream the weights from memory once; and next to those products it runs ~1,000 tiny ops,
 * whose fixed cost (a few microseconds each in PyTorch) adds up to as much again.
 *
 * matvec: PyTorch's bf16 F.linear (oneDNN) reads the weights well below memory bandwidth in a decode
 * loop (tools/bench_matvec.py, docs/benchmarks.md); this loop reads each weight once, with
 * prefetching, converts bf16 -> fp32 in registers (exact: a bf16 is
 * the top half of an fp32), multiplies and accumulates in fp32, and rounds the output once.
 * That is the definition of a bf16 matmul (bf16 inputs, fp32 accumulation), so the result differs from
 * PyTorch's only in the order of the sums.
 *
 * Layout: w row-major (N, K), x row-major (M, K), y row-major (M, N); all contiguous.
 * dtypes: w fp32 or bf16; x and y fp32 or bf16 (the caller passes the codes below).
 * Threads: OpenMP over blocks of output rows. PyTorch's wheels ship libgomp under the same soname, so
 * this library joins PyTorch's thread pool (and torch.set_num_threads) instead of starting its own.
 *
 * Compiled with `cc -O3 -march=native -fopenmp` (plus -DSMOLVLM_GENERIC for the portable paths only).
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
/* The AVX-512 paths are compiled where the compiler targets AVX-512 (-march=native on such a CPU),
 * unless SMOLVLM_GENERIC is defined: then every kernel takes its portable C path, which is what a
 * CPU without AVX-512 runs, and which the tests build and check on any machine. */
#if defined(__AVX512F__) && !defined(SMOLVLM_GENERIC)
#define SMOLVLM_AVX512 1
#include <immintrin.h>
#else
#define SMOLVLM_AVX512 0
#endif
/* Without AVX-512, the weight products use AVX2 + FMA where the compiler targets them (8 lanes). */
#if !SMOLVLM_AVX512 && defined(__AVX2__) && defined(__FMA__) && !defined(SMOLVLM_GENERIC)
#define SMOLVLM_AVX2 1
#include <immintrin.h>
#else
#define SMOLVLM_AVX2 0
#endif

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

/* Weight rows per block. 4 independent memory streams in flight was fastest on an Intel Xeon with
 * AVX-512; on an AMD EPYC (AVX2, 2 cores) one row at a time, a single sequential stream per thread, reads
 * 1.5-2x faster (16 vs 11 GB/s fp32, 17.5 vs 9 bf16; docs/benchmarks.md). -DROWS=n overrides. */
#ifndef ROWS
#if SMOLVLM_AVX512
#define ROWS 4
#else
#define ROWS 1
#endif
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192   /* how far ahead of the loads each row's stream is prefetched */
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as PyTorch's float -> bfloat16 conversion (NaN stays a quiet NaN). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* A dot kernel: out[m * NR + r] = dot(w row r, x row m) for NR weight rows (4, or 1 for the last
 * rows of a matrix) and MR rows of x (1, 2 or 4). Each step loads 16 weights of every row, converts
 * them once, and multiplies them with 16 values of every x row: the weights cross memory once for
 * all MR rows. Defined once per (weight type, NR, MR) by the macro; LOAD converts 16 weights to fp32. */
typedef void (*dot_fn)(const void *w, int64_t K, const float *x, float *out);

#if SMOLVLM_AVX512
/* 16 weights starting at p (the first ones selected by mask m; the rest read as 0) -> 16 fp32 lanes */
static inline __m512 load16_bf16(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);                                       /* 16 x u16 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  /* << 16 */
}
static inline __m512 load16_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

#define DEFINE_DOT(NAME, WTYPE, LOAD, NR, MR)                                                 \
    static void NAME(const void *wv, int64_t K, const float *x, float *out) {                 \
        const WTYPE *w = (const WTYPE *)wv;                                                   \
        __m512 acc[MR][NR], wk[NR];                                                           \
        for (int m = 0; m < MR; m++)                                                          \
            for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();                     \
        for (int64_t k = 0; k < K; k += 16) {                                                 \
            __mmask16 mask = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);         \
            for (int r = 0; r < NR; r++) {                                                    \
                _mm_prefetch((const char *)(w + r * K + k) + PREFETCH_BYTES, _MM_HINT_T0);    \
                wk[r] = LOAD(w + r * K + k, mask);                                            \
            }                                                                                 \
            for (int m = 0; m < MR; m++) {                                                    \
                __m512 xk = _mm512_maskz_loadu_ps(mask, x + m * K + k);                       \
                for (int r = 0; r < NR; r++) acc[m][r] = _mm512_fmadd_ps(wk[r], xk, acc[m][r]); \
            }                                                                                 \
        }                                                                                     \
        for (int m = 0; m < MR; m++)                                                          \
            for (int r = 0; r < NR; r++) out[m * NR + r] = _mm512_reduce_add_ps(acc[m][r]);   \
    }
#elif SMOLVLM_AVX2
/* 8 weights at p -> 8 fp32 lanes */
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);                                   /* 8 x u16 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  /* << 16 */
}
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
/* WTYPE is uint16_t (bf16) or float: a constant condition, folded away */
#define LOAD8(WTYPE, p) (sizeof(WTYPE) == 2 ? load8_bf16((const uint16_t *)(p)) : load8_f32((const float *)(p)))
#define LOAD1(WTYPE, p) (sizeof(WTYPE) == 2 ? bf16_to_f32(*(const uint16_t *)(p)) : *(const float *)(p))
/* As the AVX-512 version, 8 lanes at a time (16 per step, one prefetch per step and row); a K that
 * is not a multiple of 8 finishes in scalar code. LOAD is not used: LOAD8 picks by WTYPE. */
#define DEFINE_DOT(NAME, WTYPE, LOAD, NR, MR)                                                 \
    static void NAME(const void *wv, int64_t K, const float *x, float *out) {                 \
        const WTYPE *w = (const WTYPE *)wv;                                                   \
        __m256 acc[MR][NR], wk[NR];                                                           \
        for (int m = 0; m < MR; m++)                                                          \
            for (int r = 0; r < NR; r++) acc[m][r] = _mm256_setzero_ps();                     \
        int64_t k = 0;                                                                        \
        for (; k + 16 <= K; k += 16) {                                                        \
            for (int h = 0; h < 16; h += 8) {                                                 \
                for (int r = 0; r < NR; r++) {                                                \
                    if (h == 0) _mm_prefetch((const char *)(w + r * K + k) + PREFETCH_BYTES, _MM_HINT_T0); \
                    wk[r] = LOAD8(WTYPE, w + r * K + k + h);                                   \
                }                                                                             \
                for (int m = 0; m < MR; m++) {                                                \
                    __m256 xk = _mm256_loadu_ps(x + m * K + k + h);                           \
                    for (int r = 0; r < NR; r++) acc[m][r] = _mm256_fmadd_ps(wk[r], xk, acc[m][r]); \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        for (; k + 8 <= K; k += 8)                                                            \
            for (int m = 0; m < MR; m++)                                                      \
                for (int r = 0; r < NR; r++)                                                  \
                    acc[m][r] = _mm256_fmadd_ps(LOAD8(WTYPE, w + r * K + k), _mm256_loadu_ps(x + m * K + k), acc[m][r]); \
        for (int m = 0; m < MR; m++)                                                          \
            for (int r = 0; r < NR; r++) {                                                    \
                float t = hsum8(acc[m][r]);                                                   \
                for (int64_t j = k; j < K; j++) t += LOAD1(WTYPE, w + r * K + j) * x[m * K + j]; \
                out[m * NR + r] = t;                                                          \
            }                                                                                 \
    }
#else
/* Portable version (no AVX-512): the same loops in plain C, left to the compiler to vectorise. */
#define LANES 16
static inline float load16_bf16(const uint16_t *p, int j) { return bf16_to_f32(p[j]); }
static inline float load16_f32(const float *p, int j) { return p[j]; }
#define DEFINE_DOT(NAME, WTYPE, LOAD, NR, MR)                                                 \
    static void NAME(const void *wv, int64_t K, const float *x, float *out) {                 \
        const WTYPE *w = (const WTYPE *)wv;                                                   \
        float acc[MR][NR][LANES] = {{{0}}};                                                   \
        for (int64_t k = 0; k < K; k += LANES) {                                              \
            int n = K - k >= LANES ? LANES : (int)(K - k);                                    \
            for (int r = 0; r < NR; r++) {                                                    \
                __builtin_prefetch((const char *)(w + r * K + k) + PREFETCH_BYTES);           \
                for (int m = 0; m < MR; m++)                                                  \
                    for (int j = 0; j < n; j++)                                               \
                        acc[m][r][j] += LOAD(w + r * K + k, j) * x[m * K + k + j];            \
            }                                                                                 \
        }                                                                                     \
        for (int m = 0; m < MR; m++)                                                          \
            for (int r = 0; r < NR; r++) {                                                    \
                float s = 0;                                                                  \
                for (int j = 0; j < LANES; j++) s += acc[m][r][j];                            \
                out[m * NR + r] = s;                                                          \
            }                                                                                 \
    }
#endif

DEFINE_DOT(dot_bf16_4x1, uint16_t, load16_bf16, ROWS, 1)
DEFINE_DOT(dot_bf16_4x2, uint16_t, load16_bf16, ROWS, 2)
DEFINE_DOT(dot_bf16_4x4, uint16_t, load16_bf16, ROWS, 4)
DEFINE_DOT(dot_bf16_1x1, uint16_t, load16_bf16, 1, 1)
DEFINE_DOT(dot_bf16_1x2, uint16_t, load16_bf16, 1, 2)
DEFINE_DOT(dot_bf16_1x4, uint16_t, load16_bf16, 1, 4)
DEFINE_DOT(dot_f32_4x1, float, load16_f32, ROWS, 1)
DEFINE_DOT(dot_f32_4x2, float, load16_f32, ROWS, 2)
DEFINE_DOT(dot_f32_4x4, float, load16_f32, ROWS, 4)
DEFINE_DOT(dot_f32_1x1, float, load16_f32, 1, 1)
DEFINE_DOT(dot_f32_1x2, float, load16_f32, 1, 2)
DEFINE_DOT(dot_f32_1x4, float, load16_f32, 1, 4)

/* DOTS[weight dtype][NR == ROWS ? 0 : 1][MR 1, 2, 4 -> 0, 1, 2] */
static const dot_fn DOTS[2][2][3] = {
    {{dot_f32_4x1, dot_f32_4x2, dot_f32_4x4}, {dot_f32_1x1, dot_f32_1x2, dot_f32_1x4}},
    {{dot_bf16_4x1, dot_bf16_4x2, dot_bf16_4x4}, {dot_bf16_1x1, dot_bf16_1x2, dot_bf16_1x4}},
};

/* y row m starts at y + m * ldy (elements): ldy = N for a plain (M, N) output, more when the product
 * fills some columns of a wider one (the fused decoder layer's q/k/v and gate/up pieces). */
static int matvec_ld(const void *w, int w_dtype, const void *x, int x_dtype, void *y, int y_dtype,
                     int64_t M, int64_t N, int64_t K, int64_t ldy, int num_threads);

/* Returns 0 on success, 1 on an unknown dtype code, 2 if the fp32 copy of x cannot be allocated. */
int smolvlm_matvec(const void *w, int w_dtype, const void *x, int x_dtype, void *y, int y_dtype,
                   int64_t M, int64_t N, int64_t K, int num_threads) {
    return matvec_ld(w, w_dtype, x, x_dtype, y, y_dtype, M, N, K, N, num_threads);
}

static int matvec_ld(const void *w, int w_dtype, const void *x, int x_dtype, void *y, int y_dtype,
                     int64_t M, int64_t N, int64_t K, int64_t ldy, int num_threads) {
    if ((w_dtype != DTYPE_F32 && w_dtype != DTYPE_BF16) || (x_dtype != DTYPE_F32 && x_dtype != DTYPE_BF16) ||
        (y_dtype != DTYPE_F32 && y_dtype != DTYPE_BF16))
        return 1;
    /* x -> fp32 once (M * K values: a few KB), so the inner loop converts only the weights */
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (xf == NULL) return 2;
    for (int64_t i = 0; i < M * K; i++)
        xf[i] = x_dtype == DTYPE_BF16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];

    size_t w_size = w_dtype == DTYPE_BF16 ? 2 : 4;
    int64_t num_blocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < num_blocks; b++) {
        int64_t n0 = b * ROWS;
        int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        float out[4 * ROWS];  /* (MR, NR) dot products of one call */
        for (int64_t m0 = 0; m0 < M; ) {  /* x rows in groups of 4, then 2, then 1 */
            int64_t mr = M - m0 >= 4 ? 4 : (M - m0 >= 2 ? 2 : 1);
            int level = mr == 4 ? 2 : (mr == 2 ? 1 : 0);
            if (rows == ROWS) {
                DOTS[w_dtype][0][level]((const char *)w + (size_t)(n0 * K) * w_size, K, xf + m0 * K, out);
            } else {  /* the matrix's last N % ROWS rows, one at a time */
                for (int64_t r = 0; r < rows; r++) {
                    float one[4];
                    DOTS[w_dtype][1][level]((const char *)w + (size_t)((n0 + r) * K) * w_size, K, xf + m0 * K, one);
                    for (int64_t m = 0; m < mr; m++) out[m * ROWS + r] = one[m];
                }
            }
            for (int64_t m = 0; m < mr; m++)
                for (int64_t r = 0; r < rows; r++) {
                    int64_t i = (m0 + m) * ldy + n0 + r;  /* y row m0 + m, column n0 + r */
                    if (y_dtype == DTYPE_BF16) ((uint16_t *)y)[i] = f32_to_bf16(out[m * ROWS + r]);
                    else ((float *)y)[i] = out[m * ROWS + r];
                }
            m0 += mr;
        }
    }
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * RMSNorm of M rows of K values, as transformers' LlamaRMSNorm (the decoder's norms):
 *     h = float(x);  n = h / sqrt(mean(h^2) + eps)  (fp32);  y = weight * n.to(dtype)  (in dtype)
 * x, weight and y share one dtype (fp32 or bf16); for bf16 both roundings of the reference happen
 * here too (n to bf16, then the product to bf16). One call replaces the ~10 small PyTorch ops of
 * the reference, which cost more than the arithmetic on decode rows. Single-threaded: M is 1-8.
 * -------------------------------------------------------------------------------------------- */
static inline float load_value(const void *p, int dtype, int64_t i) {
    return dtype == DTYPE_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_value(void *p, int dtype, int64_t i, float v) {
    if (dtype == DTYPE_BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* the value as rounded to `dtype` and back (identity for fp32) */
static inline float round_to(int dtype, float v) { return dtype == DTYPE_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

int smolvlm_rms_norm(const void *x, const void *weight, void *y, int dtype, int64_t M, int64_t K, float eps) {
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) return 1;
    for (int64_t m = 0; m < M; m++) {
        float lanes[16] = {0};  /* 16 partial sums: vectorisable, as PyTorch's reduction */
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < 16; j++) { float h = load_value(x, dtype, m * K + k + j); lanes[j] += h * h; }
        for (; k < K; k++) { float h = load_value(x, dtype, m * K + k); lanes[0] += h * h; }
        float sum = 0;
        for (int j = 0; j < 16; j++) sum += lanes[j];
        float inv = 1.0f / sqrtf(sum / (float)K + eps);
        for (k = 0; k < K; k++) {
            float n = round_to(dtype, load_value(x, dtype, m * K + k) * inv);
            store_value(y, dtype, m * K + k, load_value(weight, dtype, k) * n);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * The paged KV cache (layout of smolvlm/engine/kv_cache.py, one layer):
 *     k_cache, v_cache  [num_blocks, block_size, Hkv, D]; token slot s = block * block_size + offset
 *
 * store_kv: k, v (N, Hkv, D) of the step's new tokens -> their slots (slot_mapping (N,) int64;
 * slot -1 = padding, skipped; returns 3, writing nothing, if a slot is past the cache's num_slots).
 * All tensors in one dtype.
 * -------------------------------------------------------------------------------------------- */
int smolvlm_store_kv(const void *k, const void *v, void *k_cache, void *v_cache, const int64_t *slot_mapping,
                     int64_t N, int64_t row_bytes, int64_t num_slots) {
    for (int64_t i = 0; i < N; i++)  /* every slot lies in the cache, or nothing is written */
        if (slot_mapping[i] >= num_slots) return 3;
    for (int64_t i = 0; i < N; i++) {
        int64_t slot = slot_mapping[i];
        if (slot < 0) continue;
        memcpy((char *)k_cache + slot * row_bytes, (const char *)k + i * row_bytes, (size_t)row_bytes);
        memcpy((char *)v_cache + slot * row_bytes, (const char *)v + i * row_bytes, (size_t)row_bytes);
    }
    return 0;
}

/* exp(x) for the softmax weights (x <= 0 there): 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, and the
 * Cephes polynomial for p (about 1 ulp from expf). Written out, not a libm call, so that a loop of it
 * vectorises: a 4,500-token context takes 40,000 of them per layer. Below -87 the weight is < 2e-38
 * and is clamped there (against a sum >= 1, it is 0 either way). */
static inline float softmax_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  /* round(x / ln2): 1.5 * 2^23 trick */
    float r = x - n * 0.693359375f - n * -2.12194440e-4f;     /* x - n ln2, ln2 split in two */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;                     /* 2^n as a float's bits */
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* dot(q, row) over D values, row in `dtype`: 16 independent partial sums, so the loop vectorises
 * (one running sum would be a chain of dependent adds). */
static inline float dot_row(const float *q, const void *row, int dtype, int64_t D) {
#if SMOLVLM_AVX512
    if (D % 16 == 0) {  /* head dims 64, 128...: registers only, one horizontal sum at the end */
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m512 r = dtype == DTYPE_BF16 ? load16_bf16((const uint16_t *)row + d, 0xffff)
                                           : _mm512_loadu_ps((const float *)row + d);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), r, acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
#elif SMOLVLM_AVX2
    if (D % 16 == 0) {  /* two 8-lane accumulators, one horizontal sum at the end */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (int64_t d = 0; d < D; d += 16) {
            __m256 r0 = dtype == DTYPE_BF16 ? load8_bf16((const uint16_t *)row + d) : _mm256_loadu_ps((const float *)row + d);
            __m256 r1 = dtype == DTYPE_BF16 ? load8_bf16((const uint16_t *)row + d + 8) : _mm256_loadu_ps((const float *)row + d + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), r0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), r1, a1);
        }
        return hsum8(_mm256_add_ps(a0, a1));
    }
#endif
    float lanes[16] = {0};
    int64_t d = 0;
    if (dtype == DTYPE_BF16) {
        const uint16_t *r = (const uint16_t *)row;
        for (; d + 16 <= D; d += 16)
            for (int j = 0; j < 16; j++) lanes[j] += q[d + j] * bf16_to_f32(r[d + j]);
    } else {
        const float *r = (const float *)row;
        for (; d + 16 <= D; d += 16)
            for (int j = 0; j < 16; j++) lanes[j] += q[d + j] * r[d + j];
    }
    for (; d < D; d++) lanes[0] += q[d] * load_value(row, dtype, d);
    for (int width = 8; width >= 1; width /= 2)  /* pairwise: 4 dependent steps, not 16 */
        for (int j = 0; j < width; j++) lanes[j] += lanes[j + width];
    return lanes[0];
}

/* acc[0..D) += w * row (row in `dtype`) */
static inline void add_scaled_row(float *acc, float w, const void *row, int dtype, int64_t D) {
    if (dtype == DTYPE_BF16) {
        const uint16_t *r = (const uint16_t *)row;
        for (int64_t d = 0; d < D; d++) acc[d] += w * bf16_to_f32(r[d]);
    } else {
        const float *r = (const float *)row;
        for (int64_t d = 0; d < D; d++) acc[d] += w * r[d];
    }
}

/* K and V rows of one head lie Hkv * D values apart (the cache is [block, slot, Hkv, D]): a strided
 * walk the hardware prefetcher follows poorly, so each loop asks for the row ATTN_PREFETCH tokens ahead
 * (measured on the EPYC: cold-cache decode attention over 1,161 tokens 1.2x faster). */
#ifndef ATTN_PREFETCH
#define ATTN_PREFETCH 8
#endif
static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
}

/* out[0..D) = sum over t < len of w[t] * (the row at element offset rows[t] of v_cache) */
static void weighted_sum(const void *v_cache, const int64_t *rows, const float *w, int64_t len, int dtype,
                         int64_t D, float *out) {
#if SMOLVLM_AVX512
    if (D == 64) {  /* the SmolVLM2 decoders' head size: the 4 accumulators stay in registers */
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        if (dtype == DTYPE_BF16) {
            for (int64_t t = 0; t < len; t++) {
                const uint16_t *r = (const uint16_t *)v_cache + rows[t];
                __m512 wt = _mm512_set1_ps(w[t]);
                a0 = _mm512_fmadd_ps(wt, load16_bf16(r, 0xffff), a0);
                a1 = _mm512_fmadd_ps(wt, load16_bf16(r + 16, 0xffff), a1);
                a2 = _mm512_fmadd_ps(wt, load16_bf16(r + 32, 0xffff), a2);
                a3 = _mm512_fmadd_ps(wt, load16_bf16(r + 48, 0xffff), a3);
            }
        } else {
            for (int64_t t = 0; t < len; t++) {
                const float *r = (const float *)v_cache + rows[t];
                __m512 wt = _mm512_set1_ps(w[t]);
                a0 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(r), a0);
                a1 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(r + 16), a1);
                a2 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(r + 32), a2);
                a3 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(r + 48), a3);
            }
        }
        _mm512_storeu_ps(out, a0); _mm512_storeu_ps(out + 16, a1);
        _mm512_storeu_ps(out + 32, a2); _mm512_storeu_ps(out + 48, a3);
        return;
    }
#elif SMOLVLM_AVX2
    if (D == 64) {  /* 8 accumulators of 8 lanes stay in registers */
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            if (t + ATTN_PREFETCH < len) prefetch_row((const char *)v_cache + rows[t + ATTN_PREFETCH] * (dtype == DTYPE_BF16 ? 2 : 4), 64 * (dtype == DTYPE_BF16 ? 2 : 4));
            __m256 wt = _mm256_set1_ps(w[t]);
            if (dtype == DTYPE_BF16) {
                const uint16_t *r = (const uint16_t *)v_cache + rows[t];
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(wt, load8_bf16(r + 8 * j), a[j]);
            } else {
                const float *r = (const float *)v_cache + rows[t];
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(r + 8 * j), a[j]);
            }
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + 8 * j, a[j]);
        return;
    }
#endif
    size_t elem = dtype == DTYPE_BF16 ? 2 : 4;
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t t = 0; t < len; t++) add_scaled_row(out, w[t], (const char *)v_cache + rows[t] * elem, dtype, D);
}

/* Decode attention: one query token per sequence over its whole paged context.
 *     q (B, Hq, D); block_tables (B, max_blocks) int32; seq_lens (B,) int32 (context incl. the new token)
 *     out (B, Hq, D) = softmax(q . K^T * scale) V over the sequence's seq_lens[b] cached tokens
 * Query head h reads KV head h / (Hq / Hkv) (grouped-query attention). Scores, softmax and the
 * weighted sum run in fp32 (as PyTorch's CPU flash attention); the output is rounded once.
 * Threads: one (sequence, query head) pair per work item. Returns 2 if scratch memory runs out, 3 if
 * a length or a block number the reads need is out of range (nothing read then). */
int smolvlm_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                                   const int32_t *block_tables, const int32_t *seq_lens, int dtype,
                                   int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size,
                                   int64_t max_blocks, int64_t num_blocks, float scale, int num_threads) {
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) return 1;
    for (int64_t b = 0; b < B; b++) {  /* every block the loops below read lies in the cache */
        if (seq_lens[b] < 0 || seq_lens[b] > max_blocks * block_size) return 3;
        for (int64_t i = 0; i < (seq_lens[b] + block_size - 1) / block_size; i++)
            if (block_tables[b * max_blocks + i] < 0 || block_tables[b * max_blocks + i] >= num_blocks) return 3;
    }
    int64_t group = Hq / Hkv;
    size_t elem = dtype == DTYPE_BF16 ? 2 : 4;
    int failed = 0;
    #pragma omp parallel for num_threads(num_threads) schedule(dynamic)
    for (int64_t item = 0; item < B * Hq; item++) {
        int64_t b = item / Hq, h = item % Hq, kv_head = h / group;
        int64_t len = seq_lens[b];
        float *scores = (float *)malloc((size_t)(len > 0 ? len : 1) * sizeof(float));
        int64_t *rows = (int64_t *)malloc((size_t)(len > 0 ? len : 1) * sizeof(int64_t));
        float *qf = (float *)malloc((size_t)D * sizeof(float));
        float *acc = (float *)malloc((size_t)D * sizeof(float));
        if (scores == NULL || rows == NULL || qf == NULL || acc == NULL) {
            failed = 1;
            free(scores); free(rows); free(qf); free(acc);
            continue;
        }
        for (int64_t d = 0; d < D; d++) qf[d] = load_value(q, dtype, (b * Hq + h) * D + d) * scale;
        /* where each context token's row lies (in elements; the same in k_cache and v_cache): token
         * t = i * block_size + o is cache[table[i], o, kv_head, :]. Walked block by block, no division. */
        const int32_t *table = block_tables + b * max_blocks;
        for (int64_t i = 0, t = 0; t < len; i++)
            for (int64_t o = 0; o < block_size && t < len; o++, t++)
                rows[t] = (((int64_t)table[i] * block_size + o) * Hkv + kv_head) * D;
        float max_score = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            if (t + ATTN_PREFETCH < len)  /* rows lie Hkv * D apart: ask for one a few tokens ahead */
                prefetch_row((const char *)k_cache + rows[t + ATTN_PREFETCH] * (int64_t)elem, D * (int64_t)elem);
            scores[t] = dot_row(qf, (const char *)k_cache + rows[t] * (int64_t)elem, dtype, D);
            max_score = scores[t] > max_score ? scores[t] : max_score;
        }
        float lanes[16] = {0};  /* the softmax denominator in 16 partial sums (vectorises) */
        for (int64_t t = 0; t < len; t++) scores[t] = softmax_exp(scores[t] - max_score);
        int64_t t = 0;
        for (; t + 16 <= len; t += 16)
            for (int j = 0; j < 16; j++) lanes[j] += scores[t + j];
        for (; t < len; t++) lanes[0] += scores[t];
        float total = 0;
        for (int j = 0; j < 16; j++) total += lanes[j];
        weighted_sum(v_cache, rows, scores, len, dtype, D, acc);
        for (int64_t d = 0; d < D; d++)  /* an empty context (never in a decode step) gives zeros */
            store_value(out, dtype, (b * Hq + h) * D + d, len > 0 ? acc[d] / total : 0.0f);
        free(rows);
        free(scores); free(qf); free(acc);
    }
    return failed ? 2 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Rotary position embedding (rotate-half), as smolvlm.text.apply_rotary / transformers:
 *     out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[D/2:], x[:D/2])
 * x (N, H, D) with token stride x_stride (elements; heads contiguous, so a slice of the fused q/k/v
 * rows is read in place), cos/sin (N, D), out (N, H, D) contiguous; one dtype. Each of the reference's
 * three ops rounds to the dtype, and so does this loop (compiled with -ffp-contract=off: no fused
 * multiply-add merges two of them), so the result is bit-identical to the PyTorch reference.
 * -------------------------------------------------------------------------------------------- */
int smolvlm_rotary(const void *x, const void *cos, const void *sin, void *out, int dtype,
                   int64_t N, int64_t H, int64_t D, int64_t x_stride) {
    if (dtype != DTYPE_F32 && dtype != DTYPE_BF16) return 1;
    int64_t half = D / 2;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            int64_t in = n * x_stride + h * D, o = (n * H + h) * D;
            for (int64_t d = 0; d < D; d++) {
                float rotated = d < half ? -load_value(x, dtype, in + d + half) : load_value(x, dtype, in + d - half);
                float a = round_to(dtype, load_value(x, dtype, in + d) * load_value(cos, dtype, n * D + d));
                float b = round_to(dtype, rotated * load_value(sin, dtype, n * D + d));
                store_value(out, dtype, o + d, a + b);
            }
        }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * matvec_q8: y (M, N) = x (M, K) @ dequant(w)^T with w int8 (N, K) and scales fp32 (N, K / 32):
 *     dequant(w)[n, k] = w[n, k] * scales[n, k / 32]          (smolvlm/quant.py, `dequantize_int8`)
 * Summed per group of 32, then scaled: sum_g scale[n, g] * sum_j w[n, 32g + j] x[32g + j].
 *
 * AVX2 path (where the compiler targets AVX2 + FMA): x is first rounded to int16 with one fp32 scale
 * per group of 32, xs[g] = max |x[32g:32g+32]| / 32767 (|error| <= xs[g] / 2 per value: 2^-16 of the
 * group's largest |x|, against 2^-8 of the weights' own rounding), so that each group's 32 products are
 * integer multiply-adds (int8 x int16 -> int32, exact: |sum| <= 32 * 127 * 32767 < 2^24, so its fp32
 * conversion is exact too), scaled once by scale[n, g] * xs[g]. That halves the instructions per weight
 * of converting every weight to fp32, and the kernel then streams the weights near memory speed
 * (llama.cpp's Q8_0 rounds x to int8 instead, 2^-8 of the group's largest). The portable path keeps x
 * in fp32 (int8 -> fp32 per weight). A weight byte is read once per call: 28 % of fp32's traffic.
 * K must be a multiple of 32. Returns 0, 1 on a bad dtype code or K, 2 if x's copy cannot be allocated.
 * -------------------------------------------------------------------------------------------- */
#define Q8_GROUP 32
#ifndef Q8_PREFETCH
#define Q8_PREFETCH 1024  /* bytes ahead of the loads that each row stream is prefetched */
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(SMOLVLM_GENERIC)
#include <immintrin.h>
#define SMOLVLM_Q8_AVX2 1
/* x (K,) fp32 -> xq (K,) int16 and xs (K / 32,) fp32 scales, as described above (round to nearest even) */
static void quantize_x16(const float *x, int64_t K, int16_t *xq, float *xs) {
    for (int64_t g = 0; g < K / Q8_GROUP; g++) {
        float amax = 0;
        for (int j = 0; j < Q8_GROUP; j++) { float a = fabsf(x[g * Q8_GROUP + j]); amax = a > amax ? a : amax; }
        float scale = amax / 32767.0f;
        xs[g] = scale;
        float inv = scale > 0 ? 1.0f / scale : 0.0f;
        for (int j = 0; j < Q8_GROUP; j++) {
            float v = nearbyintf(x[g * Q8_GROUP + j] * inv);
            xq[g * Q8_GROUP + j] = (int16_t)(v > 32767.0f ? 32767.0f : (v < -32767.0f ? -32767.0f : v));
        }
    }
}
/* One weight row against one int16 x row: per group, 2 x 16 int8 weights widened to int16, multiplied
 * and pair-summed with x (vpmaddwd: 8 int32 lanes), converted once, scaled into the accumulator. */
static inline float dot_q8_row(const int8_t *w, const float *scale, const int16_t *xq, const float *xs, int64_t G) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int8_t *wg = w + g * Q8_GROUP;
        _mm_prefetch((const char *)wg + Q8_PREFETCH, _MM_HINT_T0);
        __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wg));         /* 16 x int16 */
        __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wg + 16)));
        __m256i p = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + g * Q8_GROUP))),
                                     _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + g * Q8_GROUP + 16))));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale[g] * xs[g]), acc);
    }
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
#else
#define SMOLVLM_Q8_AVX2 0
static inline float dot_q8_row_f32(const int8_t *w, const float *scale, const float *x, int64_t G) {
    float acc = 0;
    for (int64_t g = 0; g < G; g++) {
        const int8_t *wg = w + g * Q8_GROUP;
        const float *xg = x + g * Q8_GROUP;
        float lanes[8] = {0};
        for (int j = 0; j < Q8_GROUP; j += 8)
            for (int l = 0; l < 8; l++) lanes[l] += (float)wg[j + l] * xg[j + l];
        acc += scale[g] * (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])));
    }
    return acc;
}
#endif

static int matvec_q8_ld(const int8_t *w, const float *scales, const void *x, int x_dtype, void *y, int y_dtype,
                        int64_t M, int64_t N, int64_t K, int64_t ldy, int num_threads);

int smolvlm_matvec_q8(const int8_t *w, const float *scales, const void *x, int x_dtype, void *y, int y_dtype,
                      int64_t M, int64_t N, int64_t K, int num_threads) {
    return matvec_q8_ld(w, scales, x, x_dtype, y, y_dtype, M, N, K, N, num_threads);
}

static int matvec_q8_ld(const int8_t *w, const float *scales, const void *x, int x_dtype, void *y, int y_dtype,
                        int64_t M, int64_t N, int64_t K, int64_t ldy, int num_threads) {
    if ((x_dtype != DTYPE_F32 && x_dtype != DTYPE_BF16) || (y_dtype != DTYPE_F32 && y_dtype != DTYPE_BF16) ||
        K % Q8_GROUP != 0)
        return 1;
    int64_t G = K / Q8_GROUP;
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (xf == NULL) return 2;
    for (int64_t i = 0; i < M * K; i++)
        xf[i] = x_dtype == DTYPE_BF16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
#if SMOLVLM_Q8_AVX2
    int16_t *xq = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
    float *xs = (float *)malloc((size_t)(M * G) * sizeof(float));
    if (xq == NULL || xs == NULL) { free(xf); free(xq); free(xs); return 2; }
    for (int64_t m = 0; m < M; m++) quantize_x16(xf + m * K, K, xq + m * K, xs + m * G);
#endif
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {  /* M is 1-32: the row stays in L1 after the first */
#if SMOLVLM_Q8_AVX2
            float acc = dot_q8_row(row, scales + n * G, xq + m * K, xs + m * G, G);
#else
            float acc = dot_q8_row_f32(row, scales + n * G, xf + m * K, G);
#endif
            int64_t i = m * ldy + n;
            if (y_dtype == DTYPE_BF16) ((uint16_t *)y)[i] = f32_to_bf16(acc);
            else ((float *)y)[i] = acc;
        }
    }
#if SMOLVLM_Q8_AVX2
    free(xq);
    free(xs);
#endif
    free(xf);
    return 0;
}

/* 1 when matvec_q8's AVX2 path was compiled in, 0 for its portable C path. */
int smolvlm_q8_avx2(void) { return SMOLVLM_Q8_AVX2; }

/* 1 when the AVX-512 paths were compiled in, 0 for the portable C paths. */
int smolvlm_simd_avx512(void) { return SMOLVLM_AVX512; }

/* 1 when the fp32 / bf16 weight products' AVX2 + FMA path was compiled in (a CPU without AVX-512). */
int smolvlm_simd_avx2(void) { return SMOLVLM_AVX2; }

/* ------------------------------------------------------------------------------------------------
 * decoder_layer: one whole decoder layer of a decode step (M <= a few tokens, one per sequence), in one
 * call, the same kernels in the same order as the per-op path (smolvlm/text.py DecoderLayer.forward
 * with KernelOps and the CPU attention backend):
 *     h = rms_norm(x, ln1);  qkv = h @ [Wq; Wk; Wv]^T;  q, k = rotary(q, k);  store k, v in the cache
 *     x = x + (paged_decode_attention(q) @ Wo^T)
 *     h = rms_norm(x, ln2);  g, u = h @ [Wg; Wu]^T;  x = x + ((silu(g) * u) @ Wd^T)
 * The residual adds and silu * up are the ones PyTorch does (fp32 arithmetic, rounded to the dtype
 * after each op); silu's exp is libm's expf, where PyTorch uses its own vectorised exp (both within
 * about an ulp of each other), so this path matches the per-op one to rounding, not bit for bit.
 * A projection is 1-3 pieces side by side (fused fp32/bf16 weights: 1; int8 q/k/v: 3), each fp32/bf16
 * (scales NULL) or int8 with scales. x (M, D) is updated in place. Returns 0, or a kernel's error code
 * (1 bad dtype, 2 out of memory, 3 a slot or block outside the cache).
 * -------------------------------------------------------------------------------------------- */
typedef struct {
    const void *w;        /* (n, K) fp32/bf16 (dtype `wtype` of the layer), or int8 when scales != NULL */
    const float *scales;  /* (n, K / 32) fp32, or NULL */
    int64_t n;            /* output features of this piece */
} smolvlm_piece;

typedef struct {
    int64_t M, D, Hq, Hkv, Dh, F;  /* tokens, hidden, query heads, KV heads, head dim, MLP width */
    int dtype, wtype;              /* activations (and norms, cos/sin, KV cache); fp32/bf16 weights */
    float eps, scale;              /* RMSNorm epsilon; attention softmax scale */
    void *x;                       /* (M, D), in and out */
    const void *ln1, *ln2;         /* (D,) */
    smolvlm_piece qkv[3], o, gate_up[2], down;
    int n_qkv, n_gate_up;
    const void *cos, *sin;         /* (M, Dh) */
    void *k_cache, *v_cache;       /* [num_blocks, block_size, Hkv, Dh] */
    int64_t num_blocks, block_size, max_blocks;
    const int64_t *slot_mapping;   /* (M,) */
    const int32_t *block_tables;   /* (M, max_blocks) */
    const int32_t *seq_lens;       /* (M,) */
    int num_threads;
} smolvlm_layer;

static int project(const smolvlm_layer *L, const smolvlm_piece *pieces, int count, const void *x, int64_t K,
                   void *y, int64_t ldy) {
    size_t elem = L->dtype == DTYPE_BF16 ? 2 : 4;
    int64_t col = 0;
    for (int i = 0; i < count; i++) {
        char *yi = (char *)y + (size_t)col * elem;
        int status = pieces[i].scales
            ? matvec_q8_ld((const int8_t *)pieces[i].w, pieces[i].scales, x, L->dtype, yi, L->dtype, L->M, pieces[i].n, K, ldy, L->num_threads)
            : matvec_ld(pieces[i].w, L->wtype, x, L->dtype, yi, L->dtype, L->M, pieces[i].n, K, ldy, L->num_threads);
        if (status) return status;
        col += pieces[i].n;
    }
    return 0;
}

static inline float silu_f(float g) { return g / (1.0f + expf(-g)); }

int smolvlm_decoder_layer(const smolvlm_layer *L) {
    int dt = L->dtype;
    if ((dt != DTYPE_F32 && dt != DTYPE_BF16) || (L->wtype != DTYPE_F32 && L->wtype != DTYPE_BF16)) return 1;
    int64_t M = L->M, D = L->D, Dh = L->Dh, Hq = L->Hq, Hkv = L->Hkv, F = L->F;
    int64_t Hall = Hq + 2 * Hkv;
    size_t elem = dt == DTYPE_BF16 ? 2 : 4;
    /* scratch, in the activations' dtype: h (M, D), qkv (M, Hall, Dh), qk rotated (M, Hq + Hkv, Dh),
     * k and v contiguous (M, Hkv, Dh) each, attention out (M, Hq, Dh), o (M, D), gate_up (M, 2F) */
    size_t sizes[8] = {M * D, M * Hall * Dh, M * (Hq + Hkv) * Dh, M * Hkv * Dh, M * Hkv * Dh, M * Hq * Dh, M * D, M * 2 * F};
    size_t total = 0;
    for (int i = 0; i < 8; i++) total += sizes[i];
    char *scratch = (char *)malloc(total * elem);
    if (scratch == NULL) return 2;
    char *buf[8];
    for (size_t i = 0, off = 0; i < 8; off += sizes[i], i++) buf[i] = scratch + off * elem;
    char *h = buf[0], *qkv = buf[1], *qk = buf[2], *kc = buf[3], *vc = buf[4], *att = buf[5], *o = buf[6], *gu = buf[7];
    int status = 0;

    /* attention half */
    if ((status = smolvlm_rms_norm(L->x, L->ln1, h, dt, M, D, L->eps))) goto done;
    if ((status = project(L, L->qkv, L->n_qkv, h, D, qkv, Hall * Dh))) goto done;
    /* q and k heads rotated together (qkv rows are Hall * Dh apart) */
    if ((status = smolvlm_rotary(qkv, L->cos, L->sin, qk, dt, M, Hq + Hkv, Dh, Hall * Dh))) goto done;
    for (int64_t m = 0; m < M; m++) {
        memcpy(kc + (size_t)(m * Hkv * Dh) * elem, qk + (size_t)((m * (Hq + Hkv) + Hq) * Dh) * elem, (size_t)(Hkv * Dh) * elem);
        memcpy(vc + (size_t)(m * Hkv * Dh) * elem, qkv + (size_t)((m * Hall + Hq + Hkv) * Dh) * elem, (size_t)(Hkv * Dh) * elem);
    }
    if ((status = smolvlm_store_kv(kc, vc, L->k_cache, L->v_cache, L->slot_mapping, M, (int64_t)(Hkv * Dh * elem),
                                   L->num_blocks * L->block_size))) goto done;
    /* the query heads: the first Hq of each row of qk, rows (Hq + Hkv) * Dh apart -> contiguous (M, Hq, Dh),
     * held in qkv's room (no longer needed: k and v were copied out) */
    char *q = qkv;
    for (int64_t m = 0; m < M; m++)
        memcpy(q + (size_t)(m * Hq * Dh) * elem, qk + (size_t)(m * (Hq + Hkv) * Dh) * elem, (size_t)(Hq * Dh) * elem);
    if ((status = smolvlm_paged_decode_attention(q, L->k_cache, L->v_cache, att, L->block_tables, L->seq_lens, dt,
                                                  M, Hq, Hkv, Dh, L->block_size, L->max_blocks, L->num_blocks,
                                                  L->scale, L->num_threads))) goto done;
    if ((status = project(L, &L->o, 1, att, Hq * Dh, o, D))) goto done;
    for (int64_t i = 0; i < M * D; i++) store_value(L->x, dt, i, load_value(L->x, dt, i) + load_value(o, dt, i));

    /* MLP half */
    if ((status = smolvlm_rms_norm(L->x, L->ln2, h, dt, M, D, L->eps))) goto done;
    if ((status = project(L, L->gate_up, L->n_gate_up, h, D, gu, 2 * F))) goto done;
    /* silu(gate) * up, each op rounded to the dtype as PyTorch does, packed as (M, F) at the start of gu:
     * element (m, j) goes to m * F + j, at or before where it is read (m * 2F + j), so nothing unread is overwritten */
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < F; j++) {
            int64_t g = m * 2 * F + j;
            float a = round_to(dt, silu_f(load_value(gu, dt, g)));
            store_value(gu, dt, m * F + j, a * load_value(gu, dt, g + F));
        }
    if ((status = project(L, &L->down, 1, gu, F, o, D))) goto done;
    for (int64_t i = 0; i < M * D; i++) store_value(L->x, dt, i, load_value(L->x, dt, i) + load_value(o, dt, i));
done:
    free(scratch);
    return status;
}
