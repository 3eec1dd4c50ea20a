/* Products of a few rows with a weight read once, for decoding on a CPU:
 *     y (rows, out) = x (rows, in) @ W (out, in).T      x, y: row-major, each bf16 (io_bf16) or fp32
 * with W stored as bf16, fp32, int8 or int4 (mistral_ref/quantize.py):
 *     bf16:  W[o, i] = the fp32 whose upper 16 bits are w[o, i]      (fp32: W[o, i] = w[o, i])
 *     int8:  W[o, i] = q[o, i] * scale[o]
 *     int4:  W[o, i] = (q[o, i] - 8) * scale[g, o] + zero[g, o],  g = i / group
 * Scales are bf16 (scales_bf16 = 1) or fp32.  Built and loaded by backends/cpu_gemv.py, which says when each is
 * used; equal to F.linear(x, W.dequantize()) within fp32 rounding (tests/test_cpu_gemv.py).
 *
 * A decode step multiplies one row (or a few) by every weight of the model, so its time is the time to read the
 * weights: each kernel streams its weight once, converts it to fp32 in registers (or, for bf16 weights on CPUs
 * with AVX512-BF16, multiplies bf16 pairs into fp32 sums directly: CPU_GEMV_BF16_DOT), accumulates in fp32 (in a
 * different order than a BLAS: sums differ in the last bits) and never writes a converted copy.  OpenMP splits
 * the output rows over `threads` threads.  On x86-64 with AVX2 and FMA the loops are written with intrinsics
 * (8 floats a register, several independent sums to hide the FMA latency); elsewhere, or built with
 * -DCPU_GEMV_PORTABLE, plain loops that the compiler vectorizes for the CPU it runs on.
 *
 * int8 and int4 weights with bf16 activations (AVX2 build) multiply in integers instead: each row of x is scaled to
 * int16 (a rounding of 2^-16 of its largest value, far finer than bf16's 2^-9 of each value) and vpmaddwd
 * multiplies and adds 16 int16 pairs an instruction, without converting the weights to fp32 (fewer instructions a
 * weight; measured in README, "Speed on a CPU").  fp32 activations keep fp32 arithmetic throughout.
 */
#include <stdint.h>
#include <stdlib.h>
#include <float.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_GEMV_PORTABLE)
#include <immintrin.h>
#define CPU_GEMV_AVX2 1
#else
#define CPU_GEMV_AVX2 0
#endif
/* On CPUs with AVX-512 (BW and VNNI), unless built with -DCPU_GEMV_NO_AVX512: the inner loops of the bf16 and int8
 * kernels take 16 floats / 32 int16 a register, vpdpwssd multiplies and adds int16 pairs into int32 in one
 * instruction, and one row of x (decoding) is multiplied by four weight rows at a time (x read once for the four,
 * their horizontal sums done together).  Each 512-bit register holds exactly two of the AVX2 loop's 256-bit
 * registers, lane for lane, and is split back into them before the sums that round, which are done in the AVX2
 * loop's order: the results are bitwise those of the AVX2 loops (tests/test_cpu_gemv.py compares the two builds).
 * int4 with bf16 activations takes a 512-bit loop where the CPU also has AVX512-VBMI (int4_blocks_vbmi: one byte
 * permutation per 32 (row, input) pairs instead of the AVX2 loop's unpack and widen per 8 rows); its integer sums
 * are exact, so it too gives the AVX2 loop's results bitwise. */
#if CPU_GEMV_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    !defined(CPU_GEMV_NO_AVX512)
#define CPU_GEMV_AVX512 1
#else
#define CPU_GEMV_AVX512 0
#endif
#if CPU_GEMV_AVX512 && defined(__AVX512VBMI__)
#define CPU_GEMV_INT4_VBMI 1
#else
#define CPU_GEMV_INT4_VBMI 0
#endif
/* bf16 weights: the intrinsic loops multiply in "pairs".  Inputs 32c .. 32c + 31 of a row (chunk c) go to 16
 * lanes, lane j taking inputs 2j + 1 and then 2j of the chunk, each by one fused multiply-add into the lane's fp32
 * sum:  sum_h[j] = fma(x[2j], w[2j], fma(x[2j + 1], w[2j + 1], sum_h[j])),  h = c % 2  (two sums of 16 lanes, for
 * the latency of the additions).  That is what AVX512-BF16's vdpbf16ps does with a bf16 x, one instruction a chunk
 * (a product of two bf16 values is exact in fp32, so its "add the exact product, round" is an fma); builds
 * without it do the same operations with an fp32 copy of x that puts each chunk's odd inputs before its even ones
 * (the weights' odd inputs are their 32-bit words' upper halves: one AND, the even ones one shift: cheaper than
 * widening).  So every intrinsic build gives the same bits, except where a value or a partial sum is below
 * 2^-126: vdpbf16ps reads and writes such denormal floats as zero (no trained weight or activation is near that
 * size).  Then: sum = sum_0 + sum_1, its 16 lanes added as hsum adds them, and inputs past the last whole chunk
 * one by one.  -DCPU_GEMV_NO_BF16 builds the AVX-512 loops without the instruction (for comparisons);
 * cpu_gemv_set_bf16_dot(0) leaves it unused at run time. */
#if CPU_GEMV_AVX512 && defined(__AVX512BF16__) && !defined(CPU_GEMV_NO_BF16)
#define CPU_GEMV_BF16_DOT 1
#else
#define CPU_GEMV_BF16_DOT 0
#endif
static int bf16_dot = 1;
void cpu_gemv_set_bf16_dot(int on) { bf16_dot = on != 0; }
int cpu_gemv_bf16_dot(void) { return CPU_GEMV_BF16_DOT && bf16_dot; }
/* How x reaches the float loops (float_rows): fp32 weights and fp32 x (X_F32); bf16 weights and the fp32 copy of
 * x with odd inputs first in each chunk of 32 (X_PAIRS; in the portable build, x in fp32 as it is); bf16 weights
 * and x in bf16 as it is (X_BF16: vdpbf16ps). */
enum { X_PAIRS = 0, X_F32 = 1, X_BF16 = 2 };

/* The intrinsic loops ask for the weight rows they will read next (the rows four ahead, or the next block of 32
 * int4 rows) while multiplying the current ones: the hardware prefetchers alone kept a decode product from memory
 * at ~12 of the ~18 GB/s a plain sum reads on the AVX-512 Xeon (README "Speed on a CPU").  A prefetch changes no
 * arithmetic; -DCPU_GEMV_NO_PREFETCH builds without it, for comparison. */
#if CPU_GEMV_AVX2 && !defined(CPU_GEMV_NO_PREFETCH)
#define PREFETCH_ALWAYS(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define PREFETCH_ALWAYS(p) ((void)(p))
#endif

/* How a product of one row of x (a decode step) walks its weight.  four_rows = 1: four weight rows at a time
 * (x read once for the four) while asking for the four rows after them (PREFETCH): the faster walk on the AVX-512
 * Xeon.  four_rows = 0: one row after the other, no prefetch instructions, the hardware prefetcher alone: on the
 * Zen 4 EPYC, several streams a core and the prefetch instructions each halved the rate a core reads its weight
 * (README "Speed on a CPU").  Both walks give the same results bitwise (the four-row loops are the one-row loops'
 * arithmetic, in their order).  backends/cpu_gemv.py times both once and sets the faster (cpu_gemv_set_walk). */
static int four_rows = 1;
void cpu_gemv_set_walk(int four) { four_rows = four != 0; }
int cpu_gemv_walk(void) { return four_rows; }
#define PREFETCH(p) do { if (four_rows) PREFETCH_ALWAYS(p); } while (0)
/* The int4 loops' scales and zeros are (group, row) pairs, group by group: a block of 32 rows reads a line of them
 * in each of in / group places, one stream a group, more than the hardware prefetchers follow.  The AVX512-VBMI
 * int4 loop asks for the next block's line of each group whichever the walk (the walk's prefetches are the
 * weights'; README "Speed on a CPU" has the measurements; the AVX2 loop, measured slower with it on large inputs,
 * does not).  cpu_gemv_set_scale_prefetch(0): only where the walk prefetches (for comparisons). */
static int scale_prefetch = 1;
void cpu_gemv_set_scale_prefetch(int on) { scale_prefetch = on != 0; }
#define SZ_PREFETCH(p) do { if (scale_prefetch || four_rows) PREFETCH_ALWAYS(p); } while (0)

/* Which loops this build has: 3 = AVX-512 + AVX2 intrinsics, 2 = AVX2 intrinsics, 1 = portable. */
int cpu_gemv_isa(void) { return CPU_GEMV_AVX512 ? 3 : CPU_GEMV_AVX2 ? 2 : 1; }

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* element k of a bf16 (is_bf16) or fp32 array: scales, and the MoE function's activations */
static inline float value_at(const void *p, int64_t k, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)p)[k]) : ((const float *)p)[k];
}

/* int4 in torch's CPU byte layout (quantize.py, pack_int4): rows in blocks of 32; for each input i a block holds
 * 16 bytes, low nibbles rows 0..15, high nibbles rows 16..31.  Within a group g of inputs,
 *     sum_i x_i W[o, i] = scale[g, o] * (sum_i x_i q[o, i] - 8 sum_i x_i) + zero[g, o] * sum_i x_i
 * so the inner loop keeps one running sum of x_i q per row of the block (32 of them).  A last block of 16 rows
 * stores for each input 8 bytes holding rows (0, 1), (2, 3), ... as (low, high) nibbles: int4_tail. */
static void int4_tail(const float *x, const uint8_t *qt, const void *sz, int scales_bf16, float *y,
                      int64_t rows, int64_t out, int64_t in, int64_t group, int64_t first) {
    for (int64_t r = 0; r < rows; r++) {
        float result[16] = {0};
        for (int64_t g = 0; g < in / group; g++) {
            float acc[16] = {0}, xsum = 0.0f;
            for (int64_t i = g * group; i < (g + 1) * group; i++) {
                float xi = x[r * in + i];
                xsum += xi;
                for (int j = 0; j < 8; j++) {
                    acc[2 * j] += xi * (float)(qt[i * 8 + j] & 15);
                    acc[2 * j + 1] += xi * (float)(qt[i * 8 + j] >> 4);
                }
            }
            for (int j = 0; j < 16; j++) {
                int64_t k = (g * out + first + j) * 2;
                result[j] += value_at(sz, k, scales_bf16) * (acc[j] - 8.0f * xsum) + value_at(sz, k + 1, scales_bf16) * xsum;
            }
        }
        memcpy(y + r * out + first, result, sizeof result);
    }
}

#if CPU_GEMV_AVX2

static inline __m256 load_bf16x8(const uint16_t *p) {  /* 8 bf16 -> 8 fp32: widen to 32 bits, shift up */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load_int8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256 u8x8_to_float(__m128i v) {  /* the low 8 bytes of v */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* (hsum(va), hsum(vb), hsum(vc), hsum(vd)): the same additions in the same order as hsum, four rows at once */
static inline __m128 hsum4(__m256 va, __m256 vb, __m256 vc, __m256 vd) {
    __m128 sa = _mm_add_ps(_mm256_castps256_ps128(va), _mm256_extractf128_ps(va, 1));
    __m128 sb = _mm_add_ps(_mm256_castps256_ps128(vb), _mm256_extractf128_ps(vb, 1));
    __m128 sc = _mm_add_ps(_mm256_castps256_ps128(vc), _mm256_extractf128_ps(vc, 1));
    __m128 sd = _mm_add_ps(_mm256_castps256_ps128(vd), _mm256_extractf128_ps(vd, 1));
    __m128 ab = _mm_add_ps(_mm_movelh_ps(sa, sb), _mm_movehl_ps(sb, sa));  /* a0+a2 a1+a3 b0+b2 b1+b3 */
    __m128 cd = _mm_add_ps(_mm_movelh_ps(sc, sd), _mm_movehl_ps(sd, sc));
    return _mm_add_ps(_mm_shuffle_ps(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)), _mm_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* NR rows of x (NR <= 4, a constant after inlining) times one weight row w (in,): y[r * out] for r < NR.
 * 32 weights a step, as 4 registers with a running sum each (per row of x). */
#define DOT(NAME, T, LOAD, TO_FLOAT)                                                                        \
    static inline __attribute__((always_inline)) void NAME(const float *x, const T *w, float *y,            \
                                                           int64_t in, int64_t out, const int NR) {          \
        __m256 acc[4][4];                                                                                   \
        for (int r = 0; r < NR; r++)                                                                        \
            for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();                                    \
        int64_t i = 0;                                                                                      \
        for (; i + 32 <= in; i += 32)                                                                       \
            for (int u = 0; u < 4; u++) {                                                                   \
                if (u == 0) PREFETCH(w + 4 * in + i);  /* four rows ahead */                                \
                __m256 wv = LOAD(w + i + 8 * u);                                                            \
                for (int r = 0; r < NR; r++)                                                                \
                    acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * in + i + 8 * u), wv, acc[r][u]);    \
            }                                                                                               \
        for (int r = 0; r < NR; r++) {                                                                      \
            float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]))); \
            for (int64_t j = i; j < in; j++) s += x[r * in + j] * TO_FLOAT(w[j]);                           \
            y[r * out] = s;                                                                                 \
        }                                                                                                   \
    }

/* bf16 weights in pairs (see CPU_GEMV_BF16_DOT): lanes 8q .. 8q + 7 of a chunk, its inputs 16q .. 16q + 15, from
 * the chunk's x copy xs (odd inputs 0..15, then even ones 16..31) */
static inline __m256 pairs8(__m256 sum, const float *xs, const uint16_t *w, int q) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 16 * q));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    sum = _mm256_fmadd_ps(_mm256_loadu_ps(xs + 8 * q), odd, sum);
    return _mm256_fmadd_ps(_mm256_loadu_ps(xs + 16 + 8 * q), _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), sum);
}

#if CPU_GEMV_AVX512
static inline __m256 upper8(__m512 v) {  /* lanes 8..15 (AVX-512F alone) */
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* DOT with 16-float registers: acc[r][h] holds the AVX2 loop's acc[r][2h] (low half) and acc[r][2h+1] (high). */
#define DOT512(NAME, T, LOAD, TO_FLOAT)                                                                     \
    static inline __attribute__((always_inline)) void NAME(const float *x, const T *w, float *y,            \
                                                           int64_t in, int64_t out, const int NR) {          \
        __m512 acc[4][2];                                                                                   \
        for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                          \
        int64_t i = 0;                                                                                      \
        for (; i + 32 <= in; i += 32)                                                                       \
            for (int h = 0; h < 2; h++) {                                                                   \
                if (h == 0) PREFETCH(w + 4 * in + i);  /* four rows ahead */                                \
                __m512 wv = LOAD(w + i + 16 * h);                                                           \
                for (int r = 0; r < NR; r++)                                                                \
                    acc[r][h] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * in + i + 16 * h), wv, acc[r][h]);   \
            }                                                                                               \
        for (int r = 0; r < NR; r++) {                                                                      \
            __m256 a01 = _mm256_add_ps(_mm512_castps512_ps256(acc[r][0]), upper8(acc[r][0])); \
            __m256 a23 = _mm256_add_ps(_mm512_castps512_ps256(acc[r][1]), upper8(acc[r][1])); \
            float s = hsum(_mm256_add_ps(a01, a23));                                                        \
            for (int64_t j = i; j < in; j++) s += x[r * in + j] * TO_FLOAT(w[j]);                           \
            y[r * out] = s;                                                                                 \
        }                                                                                                   \
    }
static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 load_int8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#define INT8_TO_FLOAT(v) ((float)(v))
DOT512(dot_int8, int8_t, load_int8x16, INT8_TO_FLOAT)

/* bf16 weights in pairs, 16 lanes a chunk: from the x copy of X_PAIRS, or (pairs16_bf16) bf16 x by vdpbf16ps */
static inline __m512 pairs16(__m512 sum, const float *xs, const uint16_t *w) {
    const __m512i v = _mm512_loadu_si512((const void *)w);
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
    sum = _mm512_fmadd_ps(_mm512_loadu_ps(xs), odd, sum);
    return _mm512_fmadd_ps(_mm512_loadu_ps(xs + 16), _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), sum);
}
#if CPU_GEMV_BF16_DOT
static inline __m512 pairs16_bf16(__m512 sum, const uint16_t *x, const uint16_t *w) {
    return _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512((const void *)x), (__m512bh)_mm512_loadu_si512((const void *)w));
}
#endif
#define X_FLOAT(x, k) ((x)[k])
#define X_BF16_FLOAT(x, k) bf16_to_float((x)[k])

/* NR rows of x (NR <= 4) times one bf16 weight row, in pairs: sum[r][h] is the AVX2 loop's sums[r][2h] (lanes
 * 0..7) and [2h + 1] (8..15).  XT: float (X_PAIRS) or uint16_t (X_BF16), STEP: pairs16 or pairs16_bf16. */
#define PAIRS512(NAME, XT, STEP, X_AT)                                                                      \
    static inline __attribute__((always_inline)) void NAME(const XT *x, const uint16_t *w, float *y,       \
                                                           int64_t in, int64_t out, const int NR) {         \
        __m512 sum[4][2];                                                                                   \
        for (int r = 0; r < NR; r++) sum[r][0] = sum[r][1] = _mm512_setzero_ps();                          \
        int64_t i = 0;                                                                                      \
        for (; i + 64 <= in; i += 64) {                                                                     \
            PREFETCH(w + 4 * in + i);  /* four rows ahead: the two lines of these 64 weights */             \
            PREFETCH(w + 4 * in + i + 32);                                                                  \
            for (int h = 0; h < 2; h++)                                                                     \
                for (int r = 0; r < NR; r++) sum[r][h] = STEP(sum[r][h], x + r * in + i + 32 * h, w + i + 32 * h); \
        }                                                                                                   \
        if (i + 32 <= in) {                                                                                 \
            PREFETCH(w + 4 * in + i);                                                                       \
            for (int r = 0; r < NR; r++) sum[r][0] = STEP(sum[r][0], x + r * in + i, w + i);                \
            i += 32;                                                                                        \
        }                                                                                                   \
        for (int r = 0; r < NR; r++) {                                                                      \
            const __m512 v = _mm512_add_ps(sum[r][0], sum[r][1]);                                           \
            float s = hsum(_mm256_add_ps(_mm512_castps512_ps256(v), upper8(v)));                            \
            for (int64_t j = i; j < in; j++) s += X_AT(x + r * in, j) * bf16_to_float(w[j]);                \
            y[r * out] = s;                                                                                 \
        }                                                                                                   \
    }
PAIRS512(dot_pairs, float, pairs16, X_FLOAT)
#if CPU_GEMV_BF16_DOT
PAIRS512(dot_pairs_bf16, uint16_t, pairs16_bf16, X_BF16_FLOAT)
#endif

/* One row of x times four bf16 weight rows in pairs (the decode case, as DOT4): PAIRS512's arithmetic, in its
 * order, for each of the four rows. */
#define PAIRS4(NAME, XT, STEP, X_AT)                                                                        \
    static inline void NAME(const XT *x, const uint16_t *w, float *y, int64_t in) {                        \
        __m512 sum[4][2];                                                                                   \
        for (int k = 0; k < 4; k++) sum[k][0] = sum[k][1] = _mm512_setzero_ps();                           \
        int64_t i = 0;                                                                                      \
        for (; i + 64 <= in; i += 64)                                                                       \
            for (int h = 0; h < 2; h++) {                                                                   \
                for (int k = 0; k < 4; k++) PREFETCH(w + (4 + k) * in + i + 32 * h);  /* the next four rows */ \
                for (int k = 0; k < 4; k++) sum[k][h] = STEP(sum[k][h], x + i + 32 * h, w + k * in + i + 32 * h); \
            }                                                                                               \
        if (i + 32 <= in) {                                                                                 \
            for (int k = 0; k < 4; k++) PREFETCH(w + (4 + k) * in + i);                                    \
            for (int k = 0; k < 4; k++) sum[k][0] = STEP(sum[k][0], x + i, w + k * in + i);                \
            i += 32;                                                                                        \
        }                                                                                                   \
        __m256 v[4];                                                                                        \
        for (int k = 0; k < 4; k++) {                                                                       \
            const __m512 t = _mm512_add_ps(sum[k][0], sum[k][1]);                                           \
            v[k] = _mm256_add_ps(_mm512_castps512_ps256(t), upper8(t));                                     \
        }                                                                                                   \
        __m128 s = hsum4(v[0], v[1], v[2], v[3]);                                                           \
        for (int64_t j = i; j < in; j++) {                                                                  \
            __m128 wj = _mm_setr_ps(bf16_to_float(w[j]), bf16_to_float(w[in + j]), bf16_to_float(w[2 * in + j]), \
                                    bf16_to_float(w[3 * in + j]));                                          \
            s = _mm_add_ps(s, _mm_mul_ps(_mm_set1_ps(X_AT(x, j)), wj));                                    \
        }                                                                                                   \
        _mm_storeu_ps(y, s);                                                                                \
    }
PAIRS4(dot4_pairs, float, pairs16, X_FLOAT)
#if CPU_GEMV_BF16_DOT
PAIRS4(dot4_pairs_bf16, uint16_t, pairs16_bf16, X_BF16_FLOAT)
#endif

/* One row of x times four weight rows (w: 4 x in), the decode case: x read once for the four, their horizontal
 * sums done together.  The lanes, FMAs and additions are DOT512's, in its order: bitwise its results. */
#define DOT4(NAME, T, LOAD, TO_FLOAT)                                                                      \
    static inline void NAME(const float *x, const T *w, float *y, int64_t in) {                           \
        __m512 acc[4][2];                                                                                   \
        for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = _mm512_setzero_ps();                          \
        int64_t i = 0;                                                                                      \
        for (; i + 32 <= in; i += 32) {                                                                     \
            for (int k = 0; k < 4; k++)  /* the next four rows: each 64-byte line of their 32 weights */      \
                for (int b = 0; b < 32 * (int)sizeof(T); b += 64) PREFETCH((const char *)(w + (4 + k) * in + i) + b); \
            for (int h = 0; h < 2; h++) {                                                                   \
                __m512 xv = _mm512_loadu_ps(x + i + 16 * h);                                                \
                for (int k = 0; k < 4; k++)                                                                 \
                    acc[k][h] = _mm512_fmadd_ps(xv, LOAD(w + k * in + i + 16 * h), acc[k][h]);              \
            }                                                                                               \
        }                                                                                                   \
        __m256 v[4];                                                                                        \
        for (int k = 0; k < 4; k++)                                                                         \
            v[k] = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(acc[k][0]), upper8(acc[k][0])),       \
                                 _mm256_add_ps(_mm512_castps512_ps256(acc[k][1]), upper8(acc[k][1])));      \
        __m128 s = hsum4(v[0], v[1], v[2], v[3]);                                                           \
        for (int64_t j = i; j < in; j++) {                                                                  \
            __m128 wj = _mm_setr_ps(TO_FLOAT(w[j]), TO_FLOAT(w[in + j]), TO_FLOAT(w[2 * in + j]),           \
                                    TO_FLOAT(w[3 * in + j]));                                               \
            s = _mm_add_ps(s, _mm_mul_ps(_mm_set1_ps(x[j]), wj));                                          \
        }                                                                                                   \
        _mm_storeu_ps(y, s);                                                                                \
    }
#define F32_TO_FLOAT(v) (v)
DOT512(dot_f32, float, _mm512_loadu_ps, F32_TO_FLOAT)
DOT4(dot4_f32, float, _mm512_loadu_ps, F32_TO_FLOAT)
#else
#define INT8_TO_FLOAT(v) ((float)(v))
#define F32_TO_FLOAT(v) (v)
DOT(dot_f32, float, _mm256_loadu_ps, F32_TO_FLOAT)
DOT(dot_int8, int8_t, load_int8x8, INT8_TO_FLOAT)

/* NR rows of x's pairs copy times one bf16 weight row (see CPU_GEMV_BF16_DOT): sums[r][2h + q], lanes 8q .. 8q + 7
 * of the sum for chunks c % 2 == h */
static inline __attribute__((always_inline)) void dot_pairs(const float *x, const uint16_t *w, float *y,
                                                            int64_t in, int64_t out, const int NR) {
    __m256 sums[4][4];
    for (int r = 0; r < NR; r++)
        for (int u = 0; u < 4; u++) sums[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= in; i += 64) {
        PREFETCH(w + 4 * in + i);  /* four rows ahead: the two lines of these 64 weights */
        PREFETCH(w + 4 * in + i + 32);
        for (int h = 0; h < 2; h++)
            for (int q = 0; q < 2; q++)
                for (int r = 0; r < NR; r++)
                    sums[r][2 * h + q] = pairs8(sums[r][2 * h + q], x + r * in + i + 32 * h, w + i + 32 * h, q);
    }
    if (i + 32 <= in) {
        PREFETCH(w + 4 * in + i);
        for (int q = 0; q < 2; q++)
            for (int r = 0; r < NR; r++) sums[r][q] = pairs8(sums[r][q], x + r * in + i, w + i, q);
        i += 32;
    }
    for (int r = 0; r < NR; r++) {
        float s = hsum(_mm256_add_ps(_mm256_add_ps(sums[r][0], sums[r][2]), _mm256_add_ps(sums[r][1], sums[r][3])));
        for (int64_t j = i; j < in; j++) s += x[r * in + j] * bf16_to_float(w[j]);
        y[r * out] = s;
    }
}
#endif

/* all rows of x times weight row o, four rows of x at a time */
#define ROWS(DOT_FN, x, w, y, rows, out, in, o)                                            \
    do {                                                                                    \
        int64_t r = 0;                                                                      \
        for (; r + 4 <= rows; r += 4) DOT_FN(x + r * in, w, y + r * out + o, in, out, 4);   \
        switch (rows - r) {                                                                 \
            case 3: DOT_FN(x + r * in, w, y + r * out + o, in, out, 3); break;              \
            case 2: DOT_FN(x + r * in, w, y + r * out + o, in, out, 2); break;              \
            case 1: DOT_FN(x + r * in, w, y + r * out + o, in, out, 1); break;              \
        }                                                                                   \
    } while (0)

/* Output rows a <= o < b of y (rows, out) = x @ W.T: fp32 weights w (kind X_F32: an fp32 model's one-row products
 * and experts) or bf16 ones (X_PAIRS, X_BF16: x as that kind says), one weight row at a time, all rows of x each */
static void row_by_row(const void *x, const void *w, int kind, float *y, int64_t rows, int64_t out, int64_t in,
                       int64_t a, int64_t b) {
    for (int64_t o = a; o < b; o++)
        if (kind == X_F32)
            ROWS(dot_f32, (const float *)x, (const float *)w + o * in, y, rows, out, in, o);
#if CPU_GEMV_BF16_DOT
        else if (kind == X_BF16)
            ROWS(dot_pairs_bf16, (const uint16_t *)x, (const uint16_t *)w + o * in, y, rows, out, in, o);
#endif
        else
            ROWS(dot_pairs, (const float *)x, (const uint16_t *)w + o * in, y, rows, out, in, o);
}

#if CPU_GEMV_AVX512
/* One row of x: output rows a <= o < b four weight rows at a time (a multiple of 4 of them) */
static void four_by_four(const void *x, const void *w, int kind, float *y, int64_t in, int64_t a, int64_t b) {
    for (int64_t o = a; o + 4 <= b; o += 4)
        if (kind == X_F32)
            dot4_f32((const float *)x, (const float *)w + o * in, y + o, in);
#if CPU_GEMV_BF16_DOT
        else if (kind == X_BF16)
            dot4_pairs_bf16((const uint16_t *)x, (const uint16_t *)w + o * in, y + o, in);
#endif
        else
            dot4_pairs((const float *)x, (const uint16_t *)w + o * in, y + o, in);
}
#endif

/* y (rows, out) = x @ W.T, W bf16 or fp32 as `kind` says */
static void float_rows(const void *x, const void *w, int kind, float *y, int64_t rows, int64_t out, int64_t in,
                       int threads) {
#if CPU_GEMV_AVX512
    if (rows == 1 && four_rows) {  /* four weight rows at a time; the last out % 4 below */
        int64_t out4 = out / 4 * 4;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < out4; o += 4) four_by_four(x, w, kind, y, in, o, o + 4);
        row_by_row(x, w, kind, y, 1, out, in, out4, out);
        return;
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) row_by_row(x, w, kind, y, rows, out, in, o, o + 1);
}

/* float_rows' output rows a <= o < b, on the calling thread (float_products' share of a product): the same dot
 * functions row by row, four weight rows at a time where float_rows walks them so (each output bitwise the
 * one-row loops') */
static void float_range(const void *x, const void *w, int kind, float *y, int64_t rows, int64_t out, int64_t in,
                        int64_t a, int64_t b) {
    int64_t o = a;
#if CPU_GEMV_AVX512
    if (rows == 1 && four_rows) {
        four_by_four(x, w, kind, y, in, a, b);
        o = a + (b - a) / 4 * 4;
    }
#endif
    row_by_row(x, w, kind, y, rows, out, in, o, b);
}

static void int8_rows(const float *x, const int8_t *q, const void *scales, int scales_bf16, float *y,
               int64_t rows, int64_t out, int64_t in, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        ROWS(dot_int8, x, q + o * in, y, rows, out, in, o);
        float scale = value_at(scales, o, scales_bf16);
        for (int64_t r = 0; r < rows; r++) y[r * out + o] *= scale;
    }
}

/* int8 weights times bf16 activations in integers: each row of x is scaled to int16 (x16 = round(x / sx), sx =
 * max |x| / 32767: a rounding 2^-16 of the row's largest value, far below bf16's own 2^-9), and vpmaddwd multiplies
 * 16 weight / activation pairs and adds neighbours in one instruction, where the float path converts every weight
 * to fp32 first (this is 2-3x fewer instructions per weight).  The int32 sums are moved into fp32 every 1024
 * inputs (each lane's sum stays below 2^31: 2 x 127 x 32767 x 64 steps).  y = scale[o] * sx * sum(q x16). */
/* Returns 0 (nothing written that counts) if a row holds inf or NaN, or values so small that its scale would
 * underflow: the caller then takes the float path, which keeps IEEE semantics. */
static int quantize_rows_int16(const float *x, int16_t *x16, float *sx, int64_t rows, int64_t in) {
    for (int64_t r = 0; r < rows; r++) {
        float m = 0.0f;
        int nan = 0;
        for (int64_t i = 0; i < in; i++) {
            float v = fabsf(x[r * in + i]);
            nan |= v != v;
            m = v > m ? v : m;
        }
        if (nan || !(m <= FLT_MAX) || (m > 0.0f && m < 32767.0f * FLT_MIN)) return 0;
        sx[r] = m > 0.0f ? m / 32767.0f : 1.0f;
        float inv = 1.0f / sx[r];
        const float *xr = x + r * in;
        int16_t *qr = x16 + r * in;
        const __m256 vinv = _mm256_set1_ps(inv);
        int64_t i = 0;
        for (; i + 16 <= in; i += 16) {  /* lrintf's rounding (to nearest even) 16 at a time, then to int16 */
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i + 8), vinv));
            __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);  /* |values| <= 32767 */
            _mm256_storeu_si256((__m256i *)(qr + i), ab);
        }
        for (; i < in; i++) qr[i] = (int16_t)lrintf(xr[i] * inv);
    }
    return 1;
}

static inline __attribute__((always_inline)) void dot_int8_int16(const int16_t *x16, const int8_t *w, float *y,
                                                                 int64_t in, int64_t out, const int NR) {
    float total[4] = {0};
    int64_t i = 0;
    while (i + 32 <= in) {
        __m256i acc[4][2];
        for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        int64_t stop = i + 1024 < in ? i + 1024 : in;
#if CPU_GEMV_AVX512
        /* 32 pairs an instruction, into four independent sums per row (vpdpwssd's latency is several cycles)
         * whose int32 total is exact: the same lanes as the AVX2 loop's (acc[r][0], acc[r][1]) */
        __m512i a[4][4];
        for (int r = 0; r < NR; r++)
            for (int u = 0; u < 4; u++) a[r][u] = _mm512_setzero_si512();
        for (; i + 128 <= stop; i += 128)
            for (int u = 0; u < 4; u++) {
                if (!(u & 1)) PREFETCH(w + 4 * in + i + 32 * u);  /* four rows ahead, once a 64-byte line */
                __m512i wu = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + i + 32 * u)));
                for (int r = 0; r < NR; r++)
                    a[r][u] = _mm512_dpwssd_epi32(a[r][u], wu, _mm512_loadu_si512(x16 + r * in + i + 32 * u));
            }
        for (; i + 32 <= stop; i += 32) {
            __m512i w01 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + i)));
            for (int r = 0; r < NR; r++)
                a[r][0] = _mm512_dpwssd_epi32(a[r][0], w01, _mm512_loadu_si512(x16 + r * in + i));
        }
        for (int r = 0; r < NR; r++) {
            __m512i sum = _mm512_add_epi32(_mm512_add_epi32(a[r][0], a[r][1]), _mm512_add_epi32(a[r][2], a[r][3]));
            acc[r][0] = _mm512_castsi512_si256(sum);
            acc[r][1] = _mm512_extracti64x4_epi64(sum, 1);
        }
#else
        for (; i + 32 <= stop; i += 32) {
            if (!(i & 63)) PREFETCH(w + 4 * in + i);  /* four rows ahead, once a 64-byte line */
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i + 16)));
            for (int r = 0; r < NR; r++) {
                const __m256i *xr = (const __m256i *)(x16 + r * in + i);
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, _mm256_loadu_si256(xr)));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, _mm256_loadu_si256(xr + 1)));
            }
        }
#endif
        for (int r = 0; r < NR; r++)
            total[r] += hsum(_mm256_add_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_cvtepi32_ps(acc[r][1])));
    }
    for (int r = 0; r < NR; r++) {
        int64_t rest = 0;
        for (int64_t j = i; j < in; j++) rest += (int64_t)x16[r * in + j] * w[j];
        y[r * out] = total[r] + (float)rest;
    }
}

#if CPU_GEMV_AVX512
/* One row of x16 times four weight rows (w: 4 x in), the decode case: four independent sums, x read once for all
 * four, their horizontal sums done together; y[k] = sum_k * mult[k].  The integer lanes, conversions and float
 * additions are dot_int8_int16's, in its order, and mult = scale * sx as int8_rows_int16 scales: bitwise its
 * results, with a third of its instructions per row outside the inner loop. */
static inline void dot4_int8_int16(const int16_t *x, const int8_t *w, float *y, int64_t in, __m128 mult) {
    __m128 total = _mm_setzero_ps();
    int64_t i = 0;
    while (i + 32 <= in) {
        __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
        int64_t stop = i + 1024 < in ? i + 1024 : in;
        for (; i + 32 <= stop; i += 32) {
            __m512i xv = _mm512_loadu_si512(x + i);
            if (!(i & 63))  /* once per 64-byte line of each of the next four rows */
                for (int k = 0; k < 4; k++) PREFETCH(w + (4 + k) * in + i);
            for (int k = 0; k < 4; k++)
                a[k] = _mm512_dpwssd_epi32(
                    a[k], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k * in + i))), xv);
        }
        __m256 v[4];
        for (int k = 0; k < 4; k++) {
            __m512 f = _mm512_cvtepi32_ps(a[k]);
            v[k] = _mm256_add_ps(_mm512_castps512_ps256(f), upper8(f));
        }
        total = _mm_add_ps(total, hsum4(v[0], v[1], v[2], v[3]));
    }
    float rest[4];
    for (int k = 0; k < 4; k++) {
        int64_t sum = 0;
        for (int64_t j = i; j < in; j++) sum += (int64_t)x[j] * w[k * in + j];
        rest[k] = (float)sum;
    }
    _mm_storeu_ps(y, _mm_mul_ps(_mm_add_ps(total, _mm_loadu_ps(rest)), mult));
}
#endif

static void int8_rows_int16(const int16_t *x16, const float *sx, const int8_t *q, const void *scales,
                            int scales_bf16, float *y, int64_t rows, int64_t out, int64_t in, int threads) {
#if CPU_GEMV_AVX512
    if (rows == 1 && four_rows) {  /* four weight rows at a time; the last out % 4 below */
        int64_t out4 = out / 4 * 4;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < out4; o += 4) {
            __m128 s = _mm_setr_ps(value_at(scales, o, scales_bf16), value_at(scales, o + 1, scales_bf16),
                                   value_at(scales, o + 2, scales_bf16), value_at(scales, o + 3, scales_bf16));
            dot4_int8_int16(x16, q + o * in, y + o, in, _mm_mul_ps(s, _mm_set1_ps(sx[0])));
        }
        for (int64_t o = out4; o < out; o++) {
            dot_int8_int16(x16, q + o * in, y + o, in, out, 1);
            y[o] *= value_at(scales, o, scales_bf16) * sx[0];
        }
        return;
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        ROWS(dot_int8_int16, x16, q + o * in, y, rows, out, in, o);
        float scale = value_at(scales, o, scales_bf16);
        for (int64_t r = 0; r < rows; r++) y[r * out + o] *= scale * sx[r];
    }
}

/* int8_rows_int16's output rows a .. b-1 (one thread's share in quantized_products): the same dot functions and
 * scalings, so bitwise its results wherever a share starts */
static void int8_range_int16(const int16_t *x16, const float *sx, const int8_t *q, const void *scales, int scales_bf16,
                             float *y, int64_t rows, int64_t out, int64_t in, int64_t a, int64_t b) {
    int64_t o = a;
#if CPU_GEMV_AVX512
    if (rows == 1 && four_rows)
        for (; o + 4 <= b; o += 4) {
            __m128 s = _mm_setr_ps(value_at(scales, o, scales_bf16), value_at(scales, o + 1, scales_bf16),
                                   value_at(scales, o + 2, scales_bf16), value_at(scales, o + 3, scales_bf16));
            dot4_int8_int16(x16, q + o * in, y + o, in, _mm_mul_ps(s, _mm_set1_ps(sx[0])));
        }
#endif
    for (; o < b; o++) {
        ROWS(dot_int8_int16, x16, q + o * in, y, rows, out, in, o);
        float scale = value_at(scales, o, scales_bf16);
        for (int64_t r = 0; r < rows; r++) y[r * out + o] *= scale * sx[r];
    }
}

/* scales and zeros of rows k/2 .. k/2 + 7 of one group: sz holds (scale, zero) pairs */
static inline void load_scales_zeros(const void *sz, int64_t k, int scales_bf16, __m256 *s, __m256 *z) {
    if (scales_bf16) {  /* a pair is one 32-bit word: scale in the low half, zero in the high half */
        __m256i pairs = _mm256_loadu_si256((const __m256i *)((const uint16_t *)sz + k));
        *s = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        *z = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000u)));
    } else {
        __m256 a = _mm256_loadu_ps((const float *)sz + k), b = _mm256_loadu_ps((const float *)sz + k + 8);
        __m256 ss = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));  /* s0 s1 s4 s5 | s2 s3 s6 s7 */
        __m256 zz = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        *s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ss), _MM_SHUFFLE(3, 1, 2, 0)));
        *z = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(zz), _MM_SHUFFLE(3, 1, 2, 0)));
    }
}

/* One group's share of 8 rows' results: result + scale * centered + zero * xsum, where centered = sum x (q - 8)
 * and xsum = sum x over the group's inputs (the formula in int4_tail's comment); k indexes the rows' first pair. */
static inline __m256 add_group(__m256 result, __m256 centered, __m256 xsum, const void *sz, int64_t k,
                               int scales_bf16) {
    __m256 s, z;
    load_scales_zeros(sz, k, scales_bf16, &s, &z);
    return _mm256_fmadd_ps(s, centered, _mm256_fmadd_ps(z, xsum, result));
}

/* The end of one group in the integer int4 loops: the int32 sums A of rows 8u .. 8u+7 (acc[u]) and X = the group's
 * sum of x16 give sum x (q - 8) = A - 8 X, added to each row's result with the group's scale and zero (add_group). */
static inline void add_int_group(__m256 result[4], const __m256i acc[4], int32_t xsum, const void *sz, int64_t k,
                                 int scales_bf16) {
    __m256 xs = _mm256_set1_ps((float)xsum);
    __m256i x8 = _mm256_set1_epi32(8 * xsum);
    for (int u = 0; u < 4; u++)  /* k + 16 u: the first pair of rows 8u .. 8u+7 */
        result[u] = add_group(result[u], _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[u], x8)), xs, sz, k + 16 * u,
                              scales_bf16);
}

static void int4_blocks(const float *x, const uint8_t *q, const void *sz, int scales_bf16, float *y,
                        int64_t rows, int64_t out, int64_t in, int64_t group, int threads) {
    const __m128i low4 = _mm_set1_epi8(15);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < out / 32; b++) {
        const uint8_t *qb = q + b * 32 * (in / 2);  /* (in, 16) bytes */
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * in;
            __m256 result[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < in / group; g++) {
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                __m256 xsum = _mm256_setzero_ps();
                for (int64_t i = g * group; i < (g + 1) * group; i++) {
                    if (!(i & 3)) PREFETCH(qb + 16 * in + i * 16);  /* the next block of 32 rows, once a 64-byte line */
                    __m128i bytes = _mm_loadu_si128((const __m128i *)(qb + i * 16));
                    __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
                    __m256 xi = _mm256_broadcast_ss(xr + i);
                    xsum = _mm256_add_ps(xsum, xi);
                    acc[0] = _mm256_fmadd_ps(xi, u8x8_to_float(lo), acc[0]);  /* rows 0..7 */
                    acc[1] = _mm256_fmadd_ps(xi, u8x8_to_float(_mm_srli_si128(lo, 8)), acc[1]);  /* 8..15 */
                    acc[2] = _mm256_fmadd_ps(xi, u8x8_to_float(hi), acc[2]);  /* 16..23 */
                    acc[3] = _mm256_fmadd_ps(xi, u8x8_to_float(_mm_srli_si128(hi, 8)), acc[3]);  /* 24..31 */
                }
                for (int u = 0; u < 4; u++) {  /* rows 8u .. 8u+7 of the block: acc - 8 xsum */
                    __m256 centered = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), xsum, acc[u]);
                    result[u] = add_group(result[u], centered, xsum, sz, (g * out + b * 32 + 8 * u) * 2, scales_bf16);
                }
            }
            for (int u = 0; u < 4; u++) _mm256_storeu_ps(y + r * out + b * 32 + 8 * u, result[u]);
        }
    }
}

/* int4 weights times bf16 activations in integers (x16, sx as for int8): vpmaddwd takes two inputs at once, so
 * the codes of inputs i and i+1 are interleaved per row (unpack) and widened to 16 bits, and multiplied by the
 * pair (x16[i], x16[i+1]) broadcast; per group the int32 sums A = sum x16 q and X = sum x16 give
 * sum x (q - 8) = sx (A - 8 X) and sum x = sx X. */
#if CPU_GEMV_INT4_VBMI
/* int4_blocks_int16 on AVX512-VBMI (group % 4 == 0).  Four inputs of a block are 64 contiguous bytes (input i:
 * 16 bytes, rows 0..15 in the low nibbles, 16..31 in the high ones); one masked byte permutation (vpermb) turns a
 * nibble half into 32 int16 words, word 2r + t = row r of input i + t (pairs) or i + 2 + t (pairs_23), which
 * vpdpwssd multiplies by the broadcast pair (x16[i], x16[i+1]) (or i+2, i+3) and adds into int32 lane r.  The
 * group sums are exact integers, split back into the AVX2 loop's four 8-row registers before its float steps:
 * bitwise int4_blocks_int16's results. */
static void int4_block_vbmi(const int16_t *x16, const float *sx, const uint8_t *q, const void *sz, int scales_bf16,
                            float *y, int64_t rows, int64_t out, int64_t in, int64_t group, int64_t b,
                            __m512i pairs01, __m512i pairs23) {  /* rows b*32 .. b*32+31 */
    const __mmask64 low_bytes = 0x5555555555555555ULL;
    const __m512i low4 = _mm512_set1_epi8(15);
    const uint8_t *qb = q + b * 32 * (in / 2);  /* (in, 16) bytes */
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *xr = x16 + r * in;
        __m256 result[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t g = 0; g < in / group; g++) {
            /* rows 0..15 (lo) and 16..31 (hi), inputs i, i+1 (01) and i+2, i+3 (23) apart: four independent
             * chains of vpdpwssd (its latency, not its throughput, bounded two chains); exact integer sums */
            __m512i lo01 = _mm512_setzero_si512(), hi01 = lo01, lo23 = lo01, hi23 = lo01;
            int32_t xsum = 0;
            if (r == 0 && b + 1 < out / 32) {  /* the next block's scales of this group: a line of their own */
                const char *next = (const char *)sz + (g * out + (b + 1) * 32) * 2 * (scales_bf16 ? 2 : 4);
                for (int l = 0; l < (scales_bf16 ? 2 : 4); l++) SZ_PREFETCH(next + 64 * l);
            }
            for (int64_t i = g * group; i < (g + 1) * group; i += 4) {
                PREFETCH(qb + 16 * in + i * 16);  /* the next block of 32 rows, one 64-byte line */
                __m512i v = _mm512_loadu_si512(qb + i * 16);  /* inputs i .. i+3 */
                __m512i vlo = _mm512_and_si512(v, low4), vhi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                int32_t p01, p23;
                memcpy(&p01, xr + i, sizeof p01);
                memcpy(&p23, xr + i + 2, sizeof p23);
                __m512i x01 = _mm512_set1_epi32(p01), x23 = _mm512_set1_epi32(p23);
                xsum += xr[i] + xr[i + 1] + xr[i + 2] + xr[i + 3];
                lo01 = _mm512_dpwssd_epi32(lo01, _mm512_maskz_permutexvar_epi8(low_bytes, pairs01, vlo), x01);
                lo23 = _mm512_dpwssd_epi32(lo23, _mm512_maskz_permutexvar_epi8(low_bytes, pairs23, vlo), x23);
                hi01 = _mm512_dpwssd_epi32(hi01, _mm512_maskz_permutexvar_epi8(low_bytes, pairs01, vhi), x01);
                hi23 = _mm512_dpwssd_epi32(hi23, _mm512_maskz_permutexvar_epi8(low_bytes, pairs23, vhi), x23);
            }
            __m512i lo = _mm512_add_epi32(lo01, lo23), hi = _mm512_add_epi32(hi01, hi23);
            __m256i acc[4] = {_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1),
                              _mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1)};
            add_int_group(result, acc, xsum, sz, (g * out + b * 32) * 2, scales_bf16);
        }
        __m256 scale = _mm256_set1_ps(sx[r]);
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(y + r * out + b * 32 + 8 * u, _mm256_mul_ps(result[u], scale));
    }
}

/* the byte permutations of int4_block_vbmi: word w = 2r + t takes its low byte from row r of input t (pairs01) or
 * 2 + t (pairs23); the high byte of each word is masked to zero */
static void vbmi_pairs(__m512i *pairs01, __m512i *pairs23) {
    uint8_t index01[64], index23[64];
    for (int w = 0; w < 32; w++) {
        index01[2 * w] = (uint8_t)((w & 1) * 16 + w / 2), index23[2 * w] = (uint8_t)((2 + (w & 1)) * 16 + w / 2);
        index01[2 * w + 1] = index23[2 * w + 1] = 0;
    }
    *pairs01 = _mm512_loadu_si512(index01), *pairs23 = _mm512_loadu_si512(index23);
}

static void int4_blocks_vbmi(const int16_t *x16, const float *sx, const uint8_t *q, const void *sz, int scales_bf16,
                             float *y, int64_t rows, int64_t out, int64_t in, int64_t group, int threads) {
    __m512i pairs01, pairs23;
    vbmi_pairs(&pairs01, &pairs23);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < out / 32; b++)
        int4_block_vbmi(x16, sx, q, sz, scales_bf16, y, rows, out, in, group, b, pairs01, pairs23);
}
#endif

static void int4_block_int16(const int16_t *x16, const float *sx, const uint8_t *q, const void *sz, int scales_bf16,
                             float *y, int64_t rows, int64_t out, int64_t in, int64_t group, int64_t b) {
    const __m128i low4 = _mm_set1_epi8(15);
    const uint8_t *qb = q + b * 32 * (in / 2);  /* (in, 16) bytes */
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *xr = x16 + r * in;
        __m256 result[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t g = 0; g < in / group; g++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            int32_t xsum = 0;
            for (int64_t i = g * group; i < (g + 1) * group; i += 2) {
                if (!(i & 3)) PREFETCH(qb + 16 * in + i * 16);  /* the next block of 32 rows, once a 64-byte line */
                __m128i b0 = _mm_loadu_si128((const __m128i *)(qb + i * 16));
                __m128i b1 = _mm_loadu_si128((const __m128i *)(qb + (i + 1) * 16));
                __m128i lo0 = _mm_and_si128(b0, low4), lo1 = _mm_and_si128(b1, low4);
                __m128i hi0 = _mm_and_si128(_mm_srli_epi16(b0, 4), low4);
                __m128i hi1 = _mm_and_si128(_mm_srli_epi16(b1, 4), low4);
                int32_t pair;
                memcpy(&pair, xr + i, sizeof pair);
                __m256i xp = _mm256_set1_epi32(pair);  /* x16[i], x16[i+1], x16[i], ... */
                xsum += xr[i] + xr[i + 1];
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo0, lo1)), xp));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo0, lo1)), xp));
                acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(hi0, hi1)), xp));
                acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(hi0, hi1)), xp));
            }
            add_int_group(result, acc, xsum, sz, (g * out + b * 32) * 2, scales_bf16);
        }
        __m256 scale = _mm256_set1_ps(sx[r]);
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(y + r * out + b * 32 + 8 * u, _mm256_mul_ps(result[u], scale));
    }
}

static void int4_blocks_int16(const int16_t *x16, const float *sx, const uint8_t *q, const void *sz, int scales_bf16,
                              float *y, int64_t rows, int64_t out, int64_t in, int64_t group, int threads) {
#if CPU_GEMV_INT4_VBMI
    if (group % 4 == 0) {
        int4_blocks_vbmi(x16, sx, q, sz, scales_bf16, y, rows, out, in, group, threads);
        return;
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < out / 32; b++)
        int4_block_int16(x16, sx, q, sz, scales_bf16, y, rows, out, in, group, b);
}

#else  /* portable loops */

static void float_rows(const void *xv, const void *w, int kind, float *y, int64_t rows, int64_t out, int64_t in,
                       int threads) {  /* x: fp32, as it is, for every kind here (X_BF16 is the intrinsics') */
    const float *x = xv;
    const int w_f32 = kind == X_F32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++)
        for (int64_t r = 0; r < rows; r++) {
            float acc = 0.0f;
            #pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < in; i++)
                acc += x[r * in + i] * (w_f32 ? ((const float *)w)[o * in + i]
                                              : bf16_to_float(((const uint16_t *)w)[o * in + i]));
            y[r * out + o] = acc;
        }
}

static void int8_rows(const float *x, const int8_t *q, const void *scales, int scales_bf16, float *y,
               int64_t rows, int64_t out, int64_t in, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++)
        for (int64_t r = 0; r < rows; r++) {
            float acc = 0.0f;
            #pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < in; i++) acc += x[r * in + i] * (float)q[o * in + i];
            y[r * out + o] = acc * value_at(scales, o, scales_bf16);
        }
}

static void int4_blocks(const float *x, const uint8_t *q, const void *sz, int scales_bf16, float *y,
                        int64_t rows, int64_t out, int64_t in, int64_t group, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < out / 32; b++) {
        const uint8_t *qb = q + b * 32 * (in / 2);  /* (in, 16) bytes */
        for (int64_t r = 0; r < rows; r++) {
            float result[32] = {0};
            for (int64_t g = 0; g < in / group; g++) {
                float acc[32] = {0}, xsum = 0.0f;
                for (int64_t i = g * group; i < (g + 1) * group; i++) {
                    float xi = x[r * in + i];
                    xsum += xi;
                    #pragma omp simd
                    for (int j = 0; j < 16; j++) {
                        acc[j] += xi * (float)(qb[i * 16 + j] & 15);
                        acc[16 + j] += xi * (float)(qb[i * 16 + j] >> 4);
                    }
                }
                for (int j = 0; j < 32; j++) {
                    int64_t k = (g * out + b * 32 + j) * 2;
                    result[j] += value_at(sz, k, scales_bf16) * (acc[j] - 8.0f * xsum)
                               + value_at(sz, k + 1, scales_bf16) * xsum;
                }
            }
            memcpy(y + r * out + b * 32, result, sizeof result);
        }
    }
}

#endif

static void int4_rows(const float *x, const uint8_t *q, const void *sz, int scales_bf16, float *y,
               int64_t rows, int64_t out, int64_t in, int64_t group, int threads) {
    int4_blocks(x, q, sz, scales_bf16, y, rows, out, in, group, threads);
    if (out % 32)
        int4_tail(x, q + out / 32 * 32 * (in / 2), sz, scales_bf16, y, rows, out, in, group, out / 32 * 32);
}

static int fuse_products = 1;  /* 0: one region a product, as before (cpu_gemv_set_fuse: for comparisons, as
                                  * in README "Several products in one parallel region") */
void cpu_gemv_set_fuse(int fuse) { fuse_products = fuse != 0; }

/* Inside a parallel region: the calling thread's share [*lo, *hi) of `total` units of work (the output rows or
 * blocks of several products, end to end), one contiguous share a thread; and [*a, *b), the part of it in the
 * product whose units are base .. base + units - 1 (empty where *a >= *b). */
static inline void thread_share(int64_t total, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int64_t nt = 1, t = 0;
#endif
    *lo = total * t / nt, *hi = total * (t + 1) / nt;
}

static inline void share_in(int64_t lo, int64_t hi, int64_t base, int64_t units, int64_t *a, int64_t *b) {
    *a = lo > base ? lo - base : 0, *b = hi - base < units ? hi - base : units;
}

/* n products in one parallel region: ys[p] (rows, outs[p]) = xs[p] @ W_p.T.  The output rows of all n weights,
 * end to end, are cut into one contiguous share a thread: one fork and join for the n products instead of n, and a
 * thread's stream of weights runs on from one matrix into the next (the query, key and value projections, w1 and
 * w3, the chosen experts).  Every output row is computed by the same dot function as in float_rows: bitwise the
 * same results, whatever the threads. */
static void float_products(const void *const *xs, const void *const *w, int kind, float *const *ys,
                           const int64_t *outs, int64_t n, int64_t rows, int64_t in, int threads) {
#if CPU_GEMV_AVX2 && defined(_OPENMP)
    if (!fuse_products) {
        for (int64_t p = 0; p < n; p++) float_rows(xs[p], w[p], kind, ys[p], rows, outs[p], in, threads);
        return;
    }
    int64_t total = 0;
    for (int64_t p = 0; p < n; p++) total += outs[p];
    #pragma omp parallel num_threads(threads)
    {
        int64_t lo, hi, a, b;
        thread_share(total, &lo, &hi);
        for (int64_t p = 0, base = 0; p < n && base < hi; base += outs[p], p++) {
            share_in(lo, hi, base, outs[p], &a, &b);
            if (a < b) float_range(xs[p], w[p], kind, ys[p], rows, outs[p], in, a, b);
        }
    }
#else
    for (int64_t p = 0; p < n; p++) float_rows(xs[p], w[p], kind, ys[p], rows, outs[p], in, threads);
#endif
}

/* ---- the entry points (backends/cpu_gemv.py): x and y in bf16 or fp32, converted here ---------------------- */

/* fp32 views of x and of each result for the *_rows kernels: x itself and each y (fp32), or a copy of a bf16 x
 * and one buffer (the products' rows x outs floats, small next to a weight) that end_part rounds into each bf16 y.
 * The float loops take x as begin_float_io makes it (xk). */
typedef struct { const float *x; const void *xk; float *x_copy, *y_buf; } io_t;

static int begin_io(io_t *io, const void *x, int64_t nx, int64_t ny_max, int io_bf16) {
    io->x = (const float *)x, io->xk = x, io->x_copy = io->y_buf = NULL;
    if (!io_bf16) return 0;
    io->x_copy = malloc((size_t)nx * sizeof(float));
    io->y_buf = malloc((size_t)ny_max * sizeof(float));
    if (!io->x_copy || !io->y_buf) { free(io->x_copy); free(io->y_buf); return -1; }
    for (int64_t k = 0; k < nx; k++) io->x_copy[k] = bf16_to_float(((const uint16_t *)x)[k]);
    io->x = io->x_copy;
    return 0;
}

static float *part_out(const io_t *io, void *y) { return io->y_buf ? io->y_buf : (float *)y; }

static void end_part(const io_t *io, void *y, int64_t ny) {
    if (io->y_buf)
        for (int64_t k = 0; k < ny; k++) ((uint16_t *)y)[k] = float_to_bf16(io->y_buf[k]);
}

static void end_io(io_t *io) {
    free(io->x_copy);
    free(io->y_buf);
}

/* x (rows, in) as the float loops take it for weights of `w_f32`, in io->xk, and which loops (*kind): fp32 weights
 * take fp32 x (a copy where x is bf16); bf16 weights take a bf16 x as it is where the build has vdpbf16ps, else the
 * pairs copy (X_PAIRS: each whole chunk of 32 inputs with its odd inputs first, then its even ones, the inputs
 * after the last whole chunk in place; in the portable build an fp32 copy in order).  x_bf16 / y_bf16: x's and y's dtype (y_buf
 * as begin_io makes it).  0, or -1 without memory. */
static int begin_float_io(io_t *io, const void *x, int64_t rows, int64_t in, int64_t ny_max, int x_bf16, int y_bf16,
                          int w_f32, int *kind) {
    io->x = NULL, io->xk = x, io->x_copy = io->y_buf = NULL;
    *kind = w_f32 ? X_F32 : X_PAIRS;
    if (y_bf16 && !(io->y_buf = malloc((size_t)ny_max * sizeof(float)))) return -1;
#if CPU_GEMV_BF16_DOT
    if (!w_f32 && x_bf16 && bf16_dot) {
        *kind = X_BF16;
        return 0;
    }
#endif
    const int pairs = CPU_GEMV_AVX2 && !w_f32;
    if (!x_bf16 && !pairs) {
        io->x = x;
        return 0;
    }
    if (!(io->x_copy = malloc((size_t)(rows * in) * sizeof(float)))) {
        free(io->y_buf);
        io->y_buf = NULL;
        return -1;
    }
    for (int64_t r = 0, k; r < rows; r++) {
        float *row = io->x_copy + r * in;
        const int64_t at = r * in;  /* the row in x */
        for (k = 0; pairs && k + 32 <= in; k += 32)
            for (int j = 0; j < 16; j++) {
                row[k + j] = value_at(x, at + k + 2 * j + 1, x_bf16);
                row[k + 16 + j] = value_at(x, at + k + 2 * j, x_bf16);
            }
        for (; k < in; k++) row[k] = value_at(x, at + k, x_bf16);
    }
    io->xk = io->x_copy;
    if (!pairs) io->x = io->x_copy;  /* (io->x: x in fp32 in order, where there is one) */
    return 0;
}

/* row r of x as the float loops take it */
static inline const void *x_row(const io_t *io, int kind, int64_t r, int64_t in) {
    return (const char *)io->xk + r * in * (kind == X_BF16 ? sizeof(uint16_t) : sizeof(float));
}

/* Several products of one x ("many": the query, key and value projections of a layer, or w1 and w3): y[p] (rows,
 * outs[p]) = x @ W_p.T for p < n, W_p = w[p] (and scales[p]) as in the header.  One call converts x once and
 * runs the n products back to back: what a product of a small weight costs besides reading it (the call from
 * Python, x's conversion) is paid once.  For the float products io_bf16 may also be 2: bf16 x, fp32 y (the sums
 * before their rounding to bf16: for comparisons of builds). */
int gemv_float_many(const void *x, int64_t n, const void *const *w, int w_f32, void *const *y, const int64_t *outs,
                    int io_bf16, int64_t rows, int64_t in, int threads) {
    int64_t total = 0;
    for (int64_t p = 0; p < n; p++) total += outs[p];
    io_t io;
    int kind;
    if (begin_float_io(&io, x, rows, in, rows * total, io_bf16 != 0, io_bf16 == 1, w_f32, &kind)) return -1;
    const void **xs = malloc((size_t)n * sizeof(*xs));
    float **ys = malloc((size_t)n * sizeof(*ys));
    if (!xs || !ys) { free(xs); free(ys); end_io(&io); return -1; }
    for (int64_t p = 0, at = 0; p < n; at += rows * outs[p], p++)  /* a bf16 y: its own part of the fp32 buffer */
        xs[p] = io.xk, ys[p] = io.y_buf ? io.y_buf + at : (float *)y[p];
    float_products(xs, w, kind, ys, outs, n, rows, in, threads);
    if (io.y_buf)
        for (int64_t p = 0; p < n; p++)
            for (int64_t k = 0; k < rows * outs[p]; k++) ((uint16_t *)y[p])[k] = float_to_bf16(ys[p][k]);
    free(xs), free(ys);
    end_io(&io);
    return 0;
}

#if CPU_GEMV_AVX2
/* bf16 activations as int16 (quantize_rows_int16) for the integer paths: 1 with x16 / sx allocated and filled,
 * 0 if a row cannot be (the float path then), -1 without memory */
static int begin_int16(const io_t *io, int64_t rows, int64_t in, int16_t **x16, float **sx) {
    /* 64-byte aligned: a 512-bit load of x16 that straddles two cache lines costs about two (the AVX-512 loops
     * load 32 int16 at once; malloc's 16-byte alignment made int8 products 1.4x slower in one run, faster in the
     * next, depending on where the buffer landed) */
    *x16 = aligned_alloc(64, ((size_t)(rows * in) * sizeof(int16_t) + 63) / 64 * 64);
    *sx = malloc((size_t)rows * sizeof(float));
    if (!*x16 || !*sx) { free(*x16); free(*sx); return -1; }
    if (quantize_rows_int16(io->x, *x16, *sx, rows, in)) return 1;
    free(*x16);
    free(*sx);
    return 0;
}
#endif

#if CPU_GEMV_AVX2
static int integer_many(const io_t *io, const int16_t *x16, const float *sx, const void *const *q,
                        const void *const *s, int scales_bf16, void *const *y, const int64_t *outs, int64_t n,
                        int64_t rows, int64_t in, int64_t group, int row_each, int threads);
#endif

int gemv_int8_many(const void *x, int64_t n, const int8_t *const *q, const void *const *scales, int scales_bf16,
                   void *const *y, const int64_t *outs, int io_bf16, int64_t rows, int64_t in, int threads) {
    int64_t total = 0;
    for (int64_t p = 0; p < n; p++) total += outs[p];
    io_t io;
    if (begin_io(&io, x, rows * in, rows * total, io_bf16)) return -1;
#if CPU_GEMV_AVX2
    if (io_bf16) {  /* bf16 activations: the integer path (fp32 ones keep fp32 arithmetic throughout) */
        int16_t *x16;
        float *sx;
        int integer = begin_int16(&io, rows, in, &x16, &sx);
        if (integer < 0) { end_io(&io); return -1; }
        if (integer) {
            int code = integer_many(&io, x16, sx, (const void *const *)q, scales, scales_bf16, y, outs, n, rows, in,
                                    0, 0, threads);
            free(x16);
            free(sx);
            end_io(&io);
            return code;
        }
    }
#endif
    for (int64_t p = 0; p < n; p++) {
        int8_rows(io.x, q[p], scales[p], scales_bf16, part_out(&io, y[p]), rows, outs[p], in, threads);
        end_part(&io, y[p], rows * outs[p]);
    }
    end_io(&io);
    return 0;
}

#if CPU_GEMV_AVX2
/* int4_rows with the activations as int16 (x16, sx) for the blocks of 32 rows; x (fp32) for the last 16 */
static void int4_rows_int16(const int16_t *x16, const float *sx, const float *x, const uint8_t *q, const void *sz,
                            int scales_bf16, float *y, int64_t rows, int64_t out, int64_t in, int64_t group,
                            int threads) {
    int4_blocks_int16(x16, sx, q, sz, scales_bf16, y, rows, out, in, group, threads);
    if (out % 32)
        int4_tail(x, q + out / 32 * 32 * (in / 2), sz, scales_bf16, y, rows, out, in, group, out / 32 * 32);
}

/* n quantized products with int16 activations in one parallel region, as float_products does for float weights:
 * ys[p] (rows, outs[p]) = xs[p] @ W_p.T, W_p = codes q[p] and scales s[p], int8 (group == 0) or int4; x16s[p],
 * sxs[p] the int16 rows of x (xs[p], fp32: int4's 16-row tail).  The units of work (int8: output rows; int4:
 * blocks of 32 rows, and a last block of 16) of all n products, end to end, are cut into one contiguous share a
 * thread.  Each unit is computed by the function int8_rows_int16 / int4_rows_int16 use for it: bitwise their
 * results, whatever the threads. */
static void quantized_products(const int16_t *const *x16s, const float *const *sxs, const float *const *xs,
                               const void *const *q, const void *const *s, int scales_bf16, float *const *ys,
                               const int64_t *outs, int64_t n, int64_t rows, int64_t in, int64_t group, int threads) {
    int64_t total = 0;
    for (int64_t p = 0; p < n; p++) total += group ? (outs[p] + 31) / 32 : outs[p];
#if CPU_GEMV_INT4_VBMI
    __m512i pairs01, pairs23;
    vbmi_pairs(&pairs01, &pairs23);
#endif
    #pragma omp parallel num_threads(threads)
    {
        int64_t lo, hi, a, b;
        thread_share(total, &lo, &hi);
        for (int64_t p = 0, base = 0, units; p < n && base < hi; base += units, p++) {
            const int64_t out = outs[p];
            units = group ? (out + 31) / 32 : out;
            share_in(lo, hi, base, units, &a, &b);
            if (!group) {
                if (a < b) int8_range_int16(x16s[p], sxs[p], q[p], s[p], scales_bf16, ys[p], rows, out, in, a, b);
                continue;
            }
            for (int64_t u = a; u < b; u++) {
                const uint8_t *codes = q[p];
                if (u == out / 32) {  /* the last 16 rows */
                    int4_tail(xs[p], codes + out / 32 * 32 * (in / 2), s[p], scales_bf16, ys[p], rows, out, in, group,
                              out / 32 * 32);
                    continue;
                }
#if CPU_GEMV_INT4_VBMI
                if (group % 4 == 0) {
                    int4_block_vbmi(x16s[p], sxs[p], codes, s[p], scales_bf16, ys[p], rows, out, in, group, u, pairs01,
                                    pairs23);
                    continue;
                }
#endif
                int4_block_int16(x16s[p], sxs[p], codes, s[p], scales_bf16, ys[p], rows, out, in, group, u);
            }
        }
    }
}
#endif

#if CPU_GEMV_AVX2
/* The integer paths of gemv_int8_many / gemv_int4_many and of the chosen experts (x16, sx: x as int16): y[p] (rows,
 * outs[p]) = x @ W_p.T, or x's row p where row_each (one row a product: the experts' w2), in one parallel region
 * (quantized_products), or one region a product where cpu_gemv_set_fuse(0) asks.  io's y buffer (bf16 results)
 * holds rows x the sum of outs floats.  Returns 0, or -1 without memory. */
static int integer_many(const io_t *io, const int16_t *x16, const float *sx, const void *const *q,
                        const void *const *s, int scales_bf16, void *const *y, const int64_t *outs, int64_t n,
                        int64_t rows, int64_t in, int64_t group, int row_each, int threads) {
    const int16_t **x16s = malloc((size_t)(n ? n : 1) * sizeof(*x16s));
    const float **sxs = malloc((size_t)(n ? n : 1) * sizeof(*sxs)), **xs = malloc((size_t)(n ? n : 1) * sizeof(*xs));
    float **ys = malloc((size_t)(n ? n : 1) * sizeof(*ys));
    if (!x16s || !sxs || !xs || !ys) { free(x16s), free(sxs), free(xs), free(ys); return -1; }
    for (int64_t p = 0, at = 0; p < n; at += rows * outs[p], p++) {  /* a bf16 y: its own part of the fp32 buffer */
        const int64_t r = row_each ? p : 0;
        x16s[p] = x16 + r * in, sxs[p] = sx + r, xs[p] = io->x + r * in;
        ys[p] = io->y_buf ? io->y_buf + at : (float *)y[p];
    }
    if (fuse_products)
        quantized_products(x16s, sxs, xs, q, s, scales_bf16, ys, outs, n, rows, in, group, threads);
    else
        for (int64_t p = 0; p < n; p++)
            if (group)
                int4_rows_int16(x16s[p], sxs[p], xs[p], q[p], s[p], scales_bf16, ys[p], rows, outs[p], in, group,
                                threads);
            else
                int8_rows_int16(x16s[p], sxs[p], q[p], s[p], scales_bf16, ys[p], rows, outs[p], in, threads);
    if (io->y_buf)
        for (int64_t p = 0; p < n; p++)
            for (int64_t k = 0; k < rows * outs[p]; k++) ((uint16_t *)y[p])[k] = float_to_bf16(ys[p][k]);
    free(x16s), free(sxs), free(xs), free(ys);
    return 0;
}
#endif

int gemv_int4_many(const void *x, int64_t n, const uint8_t *const *q, const void *const *sz, int scales_bf16,
                   void *const *y, const int64_t *outs, int io_bf16, int64_t rows, int64_t in, int64_t group,
                   int threads) {
    int64_t total = 0;
    for (int64_t p = 0; p < n; p++) total += outs[p];
    io_t io;
    if (begin_io(&io, x, rows * in, rows * total, io_bf16)) return -1;
#if CPU_GEMV_AVX2
    if (io_bf16) {  /* bf16 activations: the integer path for the blocks of 32 rows (x as fp32 for a last 16) */
        int16_t *x16;
        float *sx;
        int integer = begin_int16(&io, rows, in, &x16, &sx);
        if (integer < 0) { end_io(&io); return -1; }
        if (integer) {
            int code = integer_many(&io, x16, sx, (const void *const *)q, sz, scales_bf16, y, outs, n, rows, in,
                                    group, 0, threads);
            free(x16);
            free(sx);
            end_io(&io);
            return code;
        }
    }
#endif
    for (int64_t p = 0; p < n; p++) {
        int4_rows(io.x, q[p], sz[p], scales_bf16, part_out(&io, y[p]), rows, outs[p], in, group, threads);
        end_part(&io, y[p], rows * outs[p]);
    }
    end_io(&io);
    return 0;
}

/* One product: the "many" entry points with n = 1. */
int gemv_float(const void *x, const void *w, int w_f32, void *y, int io_bf16, int64_t rows, int64_t out, int64_t in,
               int threads) {
    return gemv_float_many(x, 1, &w, w_f32, &y, &out, io_bf16, rows, in, threads);
}

int gemv_int8(const void *x, const int8_t *q, const void *scales, int scales_bf16, void *y, int io_bf16,
              int64_t rows, int64_t out, int64_t in, int threads) {
    return gemv_int8_many(x, 1, &q, &scales, scales_bf16, &y, &out, io_bf16, rows, in, threads);
}

int gemv_int4(const void *x, const uint8_t *q, const void *sz, int scales_bf16, void *y, int io_bf16,
              int64_t rows, int64_t out, int64_t in, int64_t group, int threads) {
    return gemv_int4_many(x, 1, &q, &sz, scales_bf16, &y, &out, io_bf16, rows, in, group, threads);
}

/* Mixture of experts, one token: y (k, out) row s = x_s @ W_s.T for the k chosen experts' weights W_s (out, in),
 * x_s = row s of x (x_rows == k) or its only row (x_rows == 1).  The static functions below take one pointer a
 * slot (`chosen`): the entry points find them in a stack of E experts (E, out, in) from the chosen indices
 * (backends/moe.py: stack_experts, compiled steps), or get them from Python, one tensor an expert (an eager step
 * of a model whose experts are not stacked: swiglu_chosen). */

/* slot s's weights in a stack: base + index[s] * bytes (one expert's); -2 if an index is not in 0 .. E-1 */
static int chosen_of(const void *base, int64_t bytes, int64_t n_experts, const int64_t *index, int64_t k,
                     const void **chosen) {
    for (int64_t s = 0; s < k; s++) {
        if (index[s] < 0 || index[s] >= n_experts) return -2;
        chosen[s] = base ? (const char *)base + index[s] * bytes : NULL;
    }
    return 0;
}

/* bf16 weights (w_f32 = 0) or fp32 ones with fp32 x and y (w_f32 = 1, io_bf16 = 0) */
static int float_experts(const void *x, int64_t x_rows, const void *const *chosen, int w_f32, int64_t k, void *y,
                         int io_bf16, int64_t out, int64_t in, int threads) {
    io_t io;
    int kind;
    if (begin_float_io(&io, x, x_rows, in, k * out, io_bf16, io_bf16, w_f32, &kind)) return -1;
    float *y_all = part_out(&io, y);
    const void **xs = malloc((size_t)k * sizeof(*xs));
    float **ys = malloc((size_t)k * sizeof(*ys));
    int64_t *outs = malloc((size_t)k * sizeof(*outs));
    if (!xs || !ys || !outs) { free(xs); free(ys); free(outs); end_io(&io); return -1; }
    for (int64_t s = 0; s < k; s++)
        xs[s] = x_row(&io, kind, x_rows == 1 ? 0 : s, in), ys[s] = y_all + s * out, outs[s] = out;
    float_products(xs, chosen, kind, ys, outs, k, 1, in, threads);  /* the k experts in one parallel region */
    end_part(&io, y, k * out);
    free(xs), free(ys), free(outs);
    end_io(&io);
    return 0;
}

/* quantized weights: codes q (out, in) int8 (group == 0) or (out, in / 2) int4 bytes, scales (out,) or scales and
 * zeros (in / group, out, 2); x converted (and rounded to int16) once for the k experts */
static int quantized_experts(const void *x, int64_t x_rows, const void *const *q, const void *const *scales,
                             int scales_bf16, int64_t k, void *y, int io_bf16, int64_t out, int64_t in,
                             int64_t group, int threads) {
    io_t io;
    if (begin_io(&io, x, x_rows * in, k * out, io_bf16)) return -1;
#if CPU_GEMV_AVX2
    if (io_bf16) {  /* bf16 activations: the integer paths, the k products in one region (integer_many) */
        int16_t *x16;
        float *sx;
        int integer = begin_int16(&io, x_rows, in, &x16, &sx);
        void **ys = malloc((size_t)(k ? k : 1) * sizeof(*ys));
        int64_t *outs = malloc((size_t)(k ? k : 1) * sizeof(*outs));
        int code = integer < 0 || !ys || !outs ? -1 : 0;
        if (integer > 0 && !code) {
            for (int64_t s = 0; s < k; s++) ys[s] = (char *)y + s * out * sizeof(uint16_t), outs[s] = out;
            code = integer_many(&io, x16, sx, q, scales, scales_bf16, ys, outs, k, 1, in, group, x_rows != 1, threads);
        }
        free(ys), free(outs);
        if (integer > 0) free(x16), free(sx);
        if (integer || code) {
            end_io(&io);
            return code;
        }
    }
#endif
    float *ys = part_out(&io, y);
    for (int64_t s = 0; s < k; s++) {  /* fp32 products */
        const int64_t r = x_rows == 1 ? 0 : s;  /* the row of x this expert takes */
        if (group == 0)
            int8_rows(io.x + r * in, (const int8_t *)q[s], scales[s], scales_bf16, ys + s * out, 1, out, in, threads);
        else
            int4_rows(io.x + r * in, q[s], scales[s], scales_bf16, ys + s * out, 1, out, in, group, threads);
    }
    end_part(&io, y, k * out);
    end_io(&io);
    return 0;
}

/* Stacked bf16 experts W (E, out, in): the products of one token's k chosen experts index[0 .. k) in one call
 * (backends/moe.py: experts_gemv).  Returns -2 if an index is not in 0 .. E-1, -1 without memory. */
int gemv_bf16_experts(const void *x, int64_t x_rows, const uint16_t *w, int64_t n_experts, const int64_t *index,
                      int64_t k, void *y, int io_bf16, int64_t out, int64_t in, int threads) {
    const void **chosen = malloc((size_t)(k ? k : 1) * sizeof *chosen);
    if (!chosen) return -1;
    int code = chosen_of(w, out * in * 2, n_experts, index, k, chosen);
    if (!code) code = float_experts(x, x_rows, chosen, 0, k, y, io_bf16, out, in, threads);
    free(chosen);
    return code;
}

/* The same for quantized experts stacked as in backends/moe.py (stack_experts): codes (E, out, in) int8 (group ==
 * 0) or (E, out, in / 2) int4 bytes, scales (E, out) or scales and zeros (E, in / group, out, 2). */
int gemv_quantized_experts(const void *x, int64_t x_rows, const void *q, const void *scales, int scales_bf16,
                           int64_t n_experts, const int64_t *index, int64_t k, void *y, int io_bf16, int64_t out,
                           int64_t in, int64_t group, int threads) {
    const int64_t q_bytes = group ? out * (in / 2) : out * in;  /* one expert's codes */
    const int64_t s_bytes = (group ? in / group * out * 2 : out) * (scales_bf16 ? 2 : 4);  /* and its scales */
    const void **chosen = malloc((size_t)(k ? 2 * k : 1) * sizeof *chosen);
    if (!chosen) return -1;
    int code = chosen_of(q, q_bytes, n_experts, index, k, chosen);
    if (!code) code = chosen_of(scales, s_bytes, n_experts, index, k, chosen + k);
    if (!code) code = quantized_experts(x, x_rows, chosen, chosen + k, scales_bf16, k, y, io_bf16, out, in, group,
                                        threads);
    free(chosen);
    return code;
}

/* ---- one token's mixture of experts, whole (backends/moe.py: mix_one_token_gemv, compiled steps) -------------- */

/* x's dtype: a float rounded to bf16 and back (io_bf16), or left as it is (fp32) */
static inline float in_dtype(float v, int io_bf16) { return io_bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

/* e^x for |x| <= SILU_EXP_MAX, where its results are normal floats: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2,
 * a degree-6 polynomial in r, then 2^n; within 2 ulp of expf), the operations of v_exp below in its order, so a
 * value gets the same bits in every lane and every build (built with -ffp-contract=off: no fused a * b + c) */
#define SILU_EXP_MAX 80.0f
static inline float exp_poly(float x) {
    const float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.0f);
    return ldexpf(p, (int)n);
}

/* SiLU as torch writes it, g / (1 + e^-g): e^-g by exp_poly for |g| <= SILU_EXP_MAX (every activation a model
 * makes), else (where e^-g overflows or is a denormal, and NaN) by expf */
static inline float silu_one(float g) {
    return g / (1.0f + (fabsf(g) <= SILU_EXP_MAX ? exp_poly(-g) : expf(-g)));
}

static void silu_values(float *g, int64_t n);  /* silu_one in place, vectorized where the build can (below) */

/* out = silu(gate) * up (n values of x's dtype), SiLU and the product each rounded to x's dtype, as
 * F.silu(gate) * up computes SwiGLU's hidden activations (moe.FeedForward); exp_poly may differ from torch's exp
 * in the last bit or two of fp32.  Each thread takes one contiguous share, SILU_CHUNK values at a time.  out may
 * be gate. */
#define SILU_CHUNK 256
static void silu_mul_chunk(const void *gate, const void *up, void *out, int io_bf16, int64_t c, int64_t m,
                           float *s);  /* values c .. c + m - 1 (below: vectorized where the build can) */
void silu_mul(const void *gate, const void *up, void *out, int io_bf16, int64_t n, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float s[SILU_CHUNK];
        int64_t lo, hi;
        thread_share(n, &lo, &hi);
        for (int64_t c = lo; c < hi; c += SILU_CHUNK)
            silu_mul_chunk(gate, up, out, io_bf16, c, hi - c < SILU_CHUNK ? hi - c : SILU_CHUNK, s);
    }
}

/* The chosen experts' products, SiLU and weighted sum:
 *     out (1, dim) = sum_s weights[s] * W2_s (silu(W1_s x) * W3_s x),   s < k
 * w1[s], w3[s] (hidden, dim) and w2[s] (dim, hidden) slot s's weights: bf16 (kind 0: s1, s3, s2 unused), fp32
 * with fp32 x (kind 3, likewise), or quantized (kind 1 int8, 2 int4: codes w and scales s as quantized_experts
 * takes them).  Rounded as the reference rounds a layer in x's dtype: the gate and up products, SiLU(gate), the
 * hidden activations and each expert's output; the k weighted outputs are summed in fp32 and rounded once
 * (backends/moe.py).  Returns 0, or -1 without memory. */
int swiglu_chosen(const void *x, int io_bf16, int kind, const void *const *w1, const void *const *s1,
                  const void *const *w3, const void *const *s3, const void *const *w2, const void *const *s2,
                  int scales_bf16, int64_t group, const float *weights, int64_t k, int64_t hidden, int64_t dim,
                  void *out, int threads) {
    const size_t size = io_bf16 ? sizeof(uint16_t) : sizeof(float);  /* x's dtype: activations, products */
    char *buf = malloc((size_t)k * (3 * (size_t)hidden + (size_t)dim) * size + 1);
    if (!buf) return -1;
    char *gate = buf, *up = gate + k * hidden * size, *h = up + k * hidden * size, *y = h + k * hidden * size;
    const int64_t g = kind == 2 ? group : 0;
    int code;
    if (kind == 0 || kind == 3) {  /* w1 and w3 of the k experts in one region: gate, then up (contiguous) */
        const void **both = malloc(2 * (size_t)k * sizeof(*both));
        if (!both) { free(buf); return -1; }
        for (int64_t s = 0; s < k; s++) both[s] = w1[s], both[k + s] = w3[s];
        code = float_experts(x, 1, both, kind == 3, 2 * k, gate, io_bf16, hidden, dim, threads);
        free(both);
    } else {  /* likewise: codes and scales of w1 then w3 */
        const void **both = malloc(4 * (size_t)k * sizeof(*both)), **scales = both + 2 * k;
        if (!both) { free(buf); return -1; }
        for (int64_t s = 0; s < k; s++) both[s] = w1[s], both[k + s] = w3[s], scales[s] = s1[s], scales[k + s] = s3[s];
        code = quantized_experts(x, 1, both, scales, scales_bf16, 2 * k, gate, io_bf16, hidden, dim, g, threads);
        free(both);
    }
    if (code) { free(buf); return code; }
    silu_mul(gate, up, h, io_bf16, k * hidden, threads);  /* h = silu(gate) * up */
    if (kind == 0 || kind == 3)
        code = float_experts(h, k, w2, kind == 3, k, y, io_bf16, dim, hidden, threads);
    else
        code = quantized_experts(h, k, w2, s2, scales_bf16, k, y, io_bf16, dim, hidden, g, threads);
    if (!code)
        for (int64_t d = 0; d < dim; d++) {  /* sum_s weights[s] y[s, d]: each term in x's dtype, the sum in fp32 */
            float sum = 0.0f;
            for (int64_t s = 0; s < k; s++)
                sum += in_dtype(value_at(y, s * dim + d, io_bf16) * in_dtype(weights[s], io_bf16), io_bf16);
            if (io_bf16) ((uint16_t *)out)[d] = float_to_bf16(sum); else ((float *)out)[d] = sum;
        }
    free(buf);
    return code;
}

/* swiglu_chosen for stacked experts: W1, W3 (E, hidden, dim) and W2 (E, dim, hidden) (bf16 or fp32: kind 0 or 3,
 * s* NULL; quantized: codes and scales stacked as gemv_quantized_experts takes them), slot s = expert index[s].
 * Returns 0, -1 without memory, -2 for an expert index out of range. */
int swiglu_experts(const void *x, int io_bf16, int kind, const void *w1, const void *s1, const void *w3,
                   const void *s3, const void *w2, const void *s2, int scales_bf16, int64_t group, int64_t n_experts,
                   const int64_t *index, const float *weights, int64_t k, int64_t hidden, int64_t dim, void *out,
                   int threads) {
    const int64_t elem = kind == 3 ? 4 : 2;  /* bytes of a float weight */
    const int64_t w1_bytes = kind == 1 ? hidden * dim : kind == 2 ? hidden * (dim / 2) : hidden * dim * elem;
    const int64_t w2_bytes = kind == 1 ? dim * hidden : kind == 2 ? dim * (hidden / 2) : dim * hidden * elem;
    const int64_t s1_bytes = (kind == 2 ? dim / (group ? group : 1) * hidden * 2 : hidden) * (scales_bf16 ? 2 : 4);
    const int64_t s2_bytes = (kind == 2 ? hidden / (group ? group : 1) * dim * 2 : dim) * (scales_bf16 ? 2 : 4);
    const void **p = malloc((size_t)(k ? 6 * k : 1) * sizeof *p);  /* w1, s1, w3, s3, w2, s2: k pointers each */
    if (!p) return -1;
    int code = chosen_of(w1, w1_bytes, n_experts, index, k, p);
    if (!code) code = chosen_of(s1, s1_bytes, n_experts, index, k, p + k);
    if (!code) code = chosen_of(w3, w1_bytes, n_experts, index, k, p + 2 * k);
    if (!code) code = chosen_of(s3, s1_bytes, n_experts, index, k, p + 3 * k);
    if (!code) code = chosen_of(w2, w2_bytes, n_experts, index, k, p + 4 * k);
    if (!code) code = chosen_of(s2, s2_bytes, n_experts, index, k, p + 5 * k);
    if (!code) code = swiglu_chosen(x, io_bf16, kind, p, p + k, p + 2 * k, p + 3 * k, p + 4 * k, p + 5 * k,
                                    scales_bf16, group, weights, k, hidden, dim, out, threads);
    free(p);
    return code;
}

/* Mixtral's router for one token (moe.route): logits (E,) = x @ gate.T in fp32, the k largest of them (the
 * lower expert first among equal logits; NaN counts as the largest, as in torch.topk), softmax over those k.
 * x: (dim,) bf16 or fp32, gate: (E, dim) bf16 or fp32 -> logits (E,), index (k,), weights (k,) fp32; returns 0. */
static void router_logits(const void *x, int io_bf16, const void *gate, int gate_bf16, int64_t n_experts,
                          int64_t dim, float *logits) {  /* logits (E,) = x @ gate.T in fp32 */
    for (int64_t e = 0; e < n_experts; e++) {
        float acc[16] = {0};  /* 16 independent sums: the compiler vectorizes them */
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int j = 0; j < 16; j++)
                acc[j] += value_at(x, i + j, io_bf16) * value_at(gate, e * dim + i + j, gate_bf16);
        float s = 0.0f;
        for (int j = 0; j < 16; j++) s += acc[j];
        for (; i < dim; i++) s += value_at(x, i, io_bf16) * value_at(gate, e * dim + i, gate_bf16);
        logits[e] = s;
    }
}

/* index[0 .. k) = the k largest of v[0 .. n) not masked out (eligible NULL, or eligible[e] != 0), largest first;
 * the lower index first among equal values, NaN as the largest (torch.topk).  k is small (2 .. 8 experts). */
static void top_k_of(const float *v, const char *eligible, int64_t n, int64_t k, int64_t *index) {
    for (int64_t s = 0; s < k; s++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n; e++) {
            int taken = eligible != NULL && !eligible[e];
            for (int64_t t = 0; t < s; t++) taken |= index[t] == e;
            if (taken) continue;
            if (best < 0 || (isnan(v[e]) && !isnan(v[best])) || v[e] > v[best]) best = e;
        }
        index[s] = best;
    }
}

int route_one_token(const void *x, int io_bf16, const void *gate, int gate_bf16, int64_t n_experts, int64_t dim,
                     int64_t k, float *logits, int64_t *index, float *weights) {
    router_logits(x, io_bf16, gate, gate_bf16, n_experts, dim, logits);
    top_k_of(logits, NULL, n_experts, k, index);
    float total = 0.0f;
    for (int64_t s = 0; s < k; s++) total += weights[s] = expf(logits[index[s]] - logits[index[0]]);
    for (int64_t s = 0; s < k; s++) weights[s] /= total;
    return 0;
}

/* fine_moe.route_fine for one token (DeepSeek's router: Mistral Small 4, Large 3), in fp32: logits (E,) = x @
 * gate.T; scores = softmax(logits) (scoring 0) or sigmoid(logits) (1); choice = scores + bias (bias: (E,) bf16 or
 * fp32, or NULL for none); of n_group equal groups of experts, only the topk_group with the largest sums of their
 * two best choices (one, for groups of one expert) stay eligible; index (k,) = the eligible experts of the k
 * largest choices, largest first; weights (k,) = their scores, divided by (their sum + 1e-20) if `norm`, times
 * routed_scale.  Returns 0, -1 without memory, -2 for groups or k that do not fit. */
int route_fine_one(const void *x, int io_bf16, const void *gate, int gate_bf16, const void *bias, int bias_bf16,
                   int64_t n_experts, int64_t dim, int scoring, int64_t n_group, int64_t topk_group, int64_t k,
                   int norm, float routed_scale, float *logits, int64_t *index, float *weights) {
    if (n_group < 1 || n_experts % n_group || topk_group < 1 || topk_group > n_group || k < 1 || k > n_experts)
        return -2;
    const int64_t size = n_experts / n_group;
    float *scores = malloc((size_t)(2 * n_experts + n_group) * sizeof(float));
    char *eligible = malloc((size_t)n_experts);
    int64_t *best = malloc((size_t)n_group * sizeof(int64_t));
    if (!scores || !eligible || !best) { free(scores); free(eligible); free(best); return -1; }
    float *choice = scores + n_experts, *group_score = choice + n_experts;
    router_logits(x, io_bf16, gate, gate_bf16, n_experts, dim, logits);
    if (scoring == 0) {  /* softmax over every expert */
        float top = logits[0], total = 0.0f;
        for (int64_t e = 1; e < n_experts; e++) top = logits[e] > top ? logits[e] : top;
        for (int64_t e = 0; e < n_experts; e++) total += scores[e] = expf(logits[e] - top);
        for (int64_t e = 0; e < n_experts; e++) scores[e] /= total;
    } else {
        for (int64_t e = 0; e < n_experts; e++) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    }
    for (int64_t e = 0; e < n_experts; e++) choice[e] = scores[e] + (bias ? value_at(bias, e, bias_bf16) : 0.0f);
    memset(eligible, 1, (size_t)n_experts);
    if (topk_group < n_group) {
        for (int64_t g = 0; g < n_group; g++) {  /* the sum of the group's two best choices */
            int64_t two[2];
            const int64_t m = size < 2 ? size : 2;
            top_k_of(choice + g * size, NULL, size, m, two);
            group_score[g] = choice[g * size + two[0]] + (m == 2 ? choice[g * size + two[1]] : 0.0f);
        }
        top_k_of(group_score, NULL, n_group, topk_group, best);
        memset(eligible, 0, (size_t)n_experts);
        for (int64_t t = 0; t < topk_group; t++) memset(eligible + best[t] * size, 1, (size_t)size);
    }
    top_k_of(choice, eligible, n_experts, k, index);
    float total = 0.0f;
    for (int64_t s = 0; s < k; s++) total += weights[s] = scores[index[s]];
    for (int64_t s = 0; s < k; s++) weights[s] = (norm ? weights[s] / (total + 1e-20f) : weights[s]) * routed_scale;
    free(scores);
    free(eligible);
    free(best);
    return 0;
}

/* route_one_token, then swiglu_experts of the chosen experts: a Mixtral MoE layer for one token in one call. */
int moe_one_token(const void *x, int io_bf16, const void *gate, int gate_bf16, int64_t top_k, int kind,
                  const void *w1, const void *s1, const void *w3, const void *s3, const void *w2, const void *s2,
                  int scales_bf16, int64_t group, int64_t n_experts, int64_t hidden, int64_t dim, void *out,
                  float *logits, int threads) {
    int64_t index[64];
    float weights[64];
    if (top_k < 1 || top_k > 64 || top_k > n_experts) return -2;
    route_one_token(x, io_bf16, gate, gate_bf16, n_experts, dim, top_k, logits, index, weights);
    return swiglu_experts(x, io_bf16, kind, w1, s1, w3, s3, w2, s2, scales_bf16, group, n_experts, index, weights,
                          top_k, hidden, dim, out, threads);
}

/* ---- RMSNorm of a few rows (an eager decode step: backends/pytorch.py, rms_norm) ------------------------------ */

#if CPU_GEMV_AVX2
static int64_t norm_scale_vec(const void *x, const void *weight, void *out, int io_bf16, int64_t r, int64_t dim,
                              float scale);  /* norm_row's second loop LANES at a time (below, after the v_* helpers) */
#endif

/* norm.rms_norm: out (rows, dim) = weight * round(x / sqrt(mean(x^2) + eps)), x, weight and out all bf16
 * (io_bf16) or all fp32; the mean of squares in fp32 (16 partial sums, then added: another order than torch's,
 * within fp32 rounding), the normalised row rounded to x's dtype before the weight multiplies, as the reference
 * rounds. */
static inline __attribute__((always_inline)) void norm_row(const void *x, const void *weight, void *out,
                                                           int io_bf16, int64_t r, int64_t dim, float eps) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16)
        for (int j = 0; j < 16; j++) {
            const float v = value_at(x, r * dim + i + j, io_bf16);
            acc[j] += v * v;
        }
    float sum = 0.0f;
    for (int j = 0; j < 16; j++) sum += acc[j];
    for (; i < dim; i++) {
        const float v = value_at(x, r * dim + i, io_bf16);
        sum += v * v;
    }
    const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
    int64_t d = 0;
#if CPU_GEMV_AVX2
    d = norm_scale_vec(x, weight, out, io_bf16, r, dim, scale);
#endif
    for (; d < dim; d++) {
        const float normed = in_dtype(value_at(x, r * dim + d, io_bf16) * scale, io_bf16);
        const float y = value_at(weight, d, io_bf16) * normed;
        if (io_bf16) ((uint16_t *)out)[r * dim + d] = float_to_bf16(y); else ((float *)out)[r * dim + d] = y;
    }
}

int rms_norm_rows(const void *x, const void *weight, void *out, int io_bf16, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) norm_row(x, weight, out, io_bf16, r, dim, eps);
    return 0;
}

/* rms_norm_rows for a prompt's rows, bitwise the same: rows split among `threads`, a loop compiled for each dtype */
void rms_norm_prompt(const void *x, const void *weight, void *out, int io_bf16, int64_t rows, int64_t dim, float eps,
                     int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (io_bf16) norm_row(x, weight, out, 1, r, dim, eps); else norm_row(x, weight, out, 0, r, dim, eps);
    }
}

/* ---- the elementwise steps of one token's block (cpu_gemv_ops.cpp: decode_model's block_step) ------------- */

#if CPU_GEMV_AVX2
static int64_t rotate_vec(const char *x, char *out, int bf16, int64_t n, const float *rot);
#endif

/* x (heads, head_dim) rotated into out (which may be x): the pairs LANES floats at a time where the build has vector
 * loops (rotate_vec), the rest one pair at a time.  (`volatile`: GCC 12 turns the plain pair loop into fused
 * multiply-add-subtract instructions, -ffp-contract=off or not, which round once where torch rounds twice.) */
static inline __attribute__((always_inline)) void rotate_heads(const void *x, void *out, int io_bf16, int64_t heads,
                                                               int64_t head_dim, const float *rot) {
    const int64_t bytes = io_bf16 ? 2 : 4;
    for (int64_t h = 0; h < heads; h++) {
        int64_t first = 0;
#if CPU_GEMV_AVX2
        first = rotate_vec((const char *)x + h * head_dim * bytes, (char *)out + h * head_dim * bytes, io_bf16,
                           head_dim, rot);
#endif
        for (int64_t j = first / 2; j < head_dim / 2; j++) {
            const int64_t i = h * head_dim + 2 * j;
            const float a = value_at(x, i, io_bf16), b = value_at(x, i + 1, io_bf16);
            const float c = rot[2 * j], s = rot[2 * j + 1];
            volatile float bs = b * s, bc = b * c;
            const float re = a * c - bs, im = a * s + bc;
            if (io_bf16) {
                ((uint16_t *)out)[i] = float_to_bf16(re);
                ((uint16_t *)out)[i + 1] = float_to_bf16(im);
            } else {
                ((float *)out)[i] = re;
                ((float *)out)[i + 1] = im;
            }
        }
    }
}

/* rope.apply_rotary_emb on one token's heads, in place, as backends/rope.py computes it: each pair (a, b) of a
 * head times the rotation (c, s) of its index, a complex product in fp32 whose four products are rounded before
 * they are added ((a c - b s, a s + b c): no fused multiply-add, as torch's complex multiplication), then rounded
 * to x's dtype.  x: (heads, head_dim) bf16 or fp32; rot: (head_dim / 2, 2) fp32, (cos, sin) of each pair. */
void rope_heads(void *x, int io_bf16, int64_t heads, int64_t head_dim, const float *rot) {
    rotate_heads(x, x, io_bf16, heads, head_dim, rot);
}

/* rope_heads for a prompt's tokens, out of place: x, out (rows, heads, head_dim) (x's rows x_stride values apart:
 * the queries or keys of a joint product's output), token r rotated by rot + r * head_dim; tokens split among
 * `threads` */
void rope_prompt(const void *x, void *out, int io_bf16, int64_t rows, int64_t heads, int64_t head_dim,
                 const float *rot, int64_t x_stride, int threads) {
    const int64_t n = heads * head_dim, bytes = io_bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * x_stride * bytes;  /* x's rows x_stride values apart (out's: n) */
        char *o = (char *)out + r * n * bytes;
        if (io_bf16) rotate_heads(xr, o, 1, heads, head_dim, rot + r * head_dim);
        else rotate_heads(xr, o, 0, heads, head_dim, rot + r * head_dim);
    }
}

/* prompt_attention.causal_span's test on the host, q_pos (B, T) and k_pos (B, S) int64 (rows contiguous): where every
 * row's queries sit at positions offset .. offset + T - 1 and its slots start .. start + offset + T - 1 hold positions
 * 0 .. offset + T - 1 (start: the first slot of row 0 holding position 0), every other slot empty (< 0), writes
 * (start, offset) to found and returns 0; else returns -1. */
int causal_span(const int64_t *q_pos, const int64_t *k_pos, int64_t B, int64_t T, int64_t S, int64_t *found) {
    if (B < 1 || T < 1) return -1;
    const int64_t offset = q_pos[0], span = offset + T;
    if (offset < 0 || span > S) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            if (q_pos[b * T + t] != offset + t) return -1;
    int64_t start = 0;
    while (start < S && k_pos[start] != 0) start++;
    if (start + span > S) return -1;  /* (no slot holds 0, or too few follow it) */
    for (int64_t b = 0; b < B; b++) {
        const int64_t *row = k_pos + b * S;
        for (int64_t j = 0; j < S; j++)
            if (j < start || j >= start + span ? row[j] >= 0 : row[j] != j - start) return -1;
    }
    found[0] = start, found[1] = offset;
    return 0;
}

/* p where every row of positions (B, T) int64 (rows contiguous) holds p .. p + T - 1, p >= 0; else -1 */
int64_t consecutive_rows(const int64_t *positions, int64_t B, int64_t T) {
    if (B < 1 || T < 1 || positions[0] < 0) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            if (positions[b * T + t] != positions[0] + t) return -1;
    return positions[0];
}

/* out = a + b (n values of x's dtype, the sum rounded to it): a residual connection */
void add_rows(const void *a, const void *b, void *out, int io_bf16, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = value_at(a, i, io_bf16) + value_at(b, i, io_bf16);
        if (io_bf16) ((uint16_t *)out)[i] = float_to_bf16(v); else ((float *)out)[i] = v;
    }
}


/* ---- attention of one query per row to a layer's KV cache (a decode step; backends/cpu_gemv.py: attend_one) --- */

/* The math of one (row, head) of attend_one below, on its fp32 query qf (head_dim,): the scores of the n slots
 * slot[0 .. n) (q . k, rounded as the caller says) into prob, and out (head_dim,) = sum_j prob[j] v[slot[j]] once
 * the caller has turned the scores into probabilities.  Key and value rows are `stride` bytes apart, bf16 or fp32. */
static float dot_key(const float *q, const char *k, int bf16, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += q[i] * value_at(k, i, bf16);
    return s;
}

static void weighted_values(float *out, const float *prob, const int64_t *slot, int64_t n, const char *v,
                            int64_t stride, int bf16, int64_t d) {
    memset(out, 0, (size_t)d * sizeof(float));
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < d; i++) out[i] += prob[j] * value_at(v + slot[j] * stride, i, bf16);
}

/* attention_mask for one query at position qp: does it see the key at position p? (window < 0: no window) */
static inline int sees(int64_t p, int64_t qp, int64_t window) {
    return p >= 0 && p <= qp && (window < 0 || p > qp - window);
}

/* the slots of one row's cache (k_pos: their positions) that its query at qp sees, into seen; their count.  None
 * seen: every slot, and *blind = 1 (the reference's softmax of equal masked scores averages them all) */
static int64_t seen_slots(const int64_t *k_pos, int64_t slots, int64_t qp, int64_t window, int64_t *seen,
                          char *blind) {
    int64_t count = 0;
    for (int64_t s = 0; s < slots; s++)
        if (sees(k_pos[s], qp, window)) seen[count++] = s;
    if ((*blind = !count))
        for (int64_t s = 0; s < slots; s++) seen[count++] = s;
    return count;
}

#if CPU_GEMV_AVX2
/* ---- attention of one query per row, grouped (head_dim a multiple of LANES) ----
 * The query heads that share a key / value head (grouped-query attention: heads / kv_heads of them) are done
 * together, up to GROUP at a time, so each key and value row of the cache is read and widened once for them;
 * LANES floats a register (16 with AVX-512, else 8 with AVX2); the softmax (scale, bf16 roundings, maximum, exp,
 * sum, division) LANES slots at a time; bf16 scores with AVX512-BF16's pair products where the CPU has them (exact
 * products of bf16 values, summed in fp32).  The sums run in another order than the plain loops above (both
 * within fp32 rounding of the reference's).  The v_* functions are the few vector operations this needs, at the
 * build's width. */
#define GROUP 4
#define AHEAD 8  /* rows of the cache asked for ahead of their use */
#if CPU_GEMV_AVX512
#define LANES 16
#define VALUE_VECS 4  /* registers of outputs per head in a pass over the value rows (GROUP x them in use) */
#define VP(name) _mm512_##name##_ps  /* the float operation `name` of this width */
typedef __m512 vec;
typedef __m512i ivec;
static inline int v_any_nan(vec v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
static inline int v_all_within(vec v, float m) {  /* |v| <= m in every lane (NaN is not) */
    return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(m), _CMP_LE_OQ) == 0xffff;
}
static inline __m256 v_fold(vec v) { return _mm256_add_ps(_mm512_castps512_ps256(v), upper8(v)); }  /* 8 sums */
static inline float v_sum(vec v) { return _mm512_reduce_add_ps(v); }
static inline float v_top(vec v) { return _mm512_reduce_max_ps(v); }
static inline vec v_row(const char *p, const int bf16) {
    return bf16 ? load_bf16x16((const uint16_t *)p) : _mm512_loadu_ps((const float *)p);
}
static inline vec v_nan_to(vec r, vec v, ivec bits) {  /* r, with v's NaN lanes set to `bits` */
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(_mm512_castps_si512(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                                     bits));
}
static inline vec v_round_int(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_scale2(vec p, vec n) { return _mm512_scalef_ps(p, n); }  /* p 2^n, through the denormals */
#define I_SET1 _mm512_set1_epi32
#define I_AND _mm512_and_si512
#define I_ADD _mm512_add_epi32
#define I_SRLI _mm512_srli_epi32
#define I_CAST _mm512_castps_si512
#define F_CAST _mm512_castsi512_ps
#else
#define LANES 8
#define VALUE_VECS 2  /* (16 registers: GROUP x 2 sums, the rows, the probability) */
#define VP(name) _mm256_##name##_ps
typedef __m256 vec;
typedef __m256i ivec;
static inline int v_any_nan(vec v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
static inline int v_all_within(vec v, float m) {
    const vec magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return _mm256_movemask_ps(_mm256_cmp_ps(magnitude, _mm256_set1_ps(m), _CMP_LE_OQ)) == 0xff;
}
static inline __m256 v_fold(vec v) { return v; }
static inline float v_sum(vec v) { return hsum(v); }
static inline float v_top(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline vec v_row(const char *p, const int bf16) {
    return bf16 ? load_bf16x8((const uint16_t *)p) : _mm256_loadu_ps((const float *)p);
}
static inline vec v_nan_to(vec r, vec v, ivec bits) {
    return _mm256_blendv_ps(r, _mm256_castsi256_ps(bits), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
static inline vec v_round_int(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_scale2(vec p, vec n) {  /* p 2^n for n >= -126, else 0 (v_exp's smallest n is -127) */
    const vec two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                             _mm256_set1_epi32(127)), 23));
    return _mm256_and_ps(_mm256_mul_ps(p, two_n), _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ));  /* NaN kept */
}
#define I_SET1 _mm256_set1_epi32
#define I_AND _mm256_and_si256
#define I_ADD _mm256_add_epi32
#define I_SRLI _mm256_srli_epi32
#define I_CAST _mm256_castps_si256
#define F_CAST _mm256_castsi256_ps
#endif
static inline vec v_zero(void) { return VP(setzero)(); }
static inline vec v_set1(float x) { return VP(set1)(x); }
static inline vec v_load(const float *p) { return VP(loadu)(p); }
static inline void v_store(float *p, vec v) { VP(storeu)(p, v); }
static inline vec v_fma(vec a, vec b, vec c) { return VP(fmadd)(a, b, c); }
static inline vec v_mul(vec a, vec b) { return VP(mul)(a, b); }
static inline vec v_add(vec a, vec b) { return VP(add)(a, b); }
static inline vec v_sub(vec a, vec b) { return VP(sub)(a, b); }
static inline vec v_div(vec a, vec b) { return VP(div)(a, b); }
static inline vec v_max(vec a, vec b) { return VP(max)(a, b); }

/* in_dtype(v, 1) of LANES floats: round to nearest even bf16 (NaN -> 0x7fc0), as float_to_bf16, and widen */
static inline vec v_round_bf16(vec v) {
    const ivec bits = I_CAST(v);
    const ivec odd = I_AND(I_SRLI(bits, 16), I_SET1(1));
    const ivec r = I_AND(I_ADD(bits, I_ADD(I_SET1(0x7fff), odd)), I_SET1((int)0xffff0000u));
    return v_nan_to(F_CAST(r), v, I_SET1(0x7fc00000));
}

/* the upper 16 bits of LANES floats (bf16 values: the bf16 numbers themselves) to p */
static inline void v_store_upper_halves(uint16_t *p, vec v) {
#if LANES == 16
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
#else
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);  /* (<= 0xffff: packus keeps them) */
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08)));
#endif
}

/* rotate_heads' pairs of one head, LANES floats (LANES / 2 pairs) at a time: (a, b) times (c, s) is
 * (a c - b s, a s + b c), each product and sum rounded as torch's complex multiplication rounds them.  Returns how
 * many of the n floats it did (a multiple of LANES); the caller does the rest. */
static int64_t rotate_vec(const char *x, char *out, int bf16, int64_t n, const float *rot) {
    const int64_t bytes = bf16 ? 2 : 4;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vec v = v_row(x + i * bytes, bf16), r = v_load(rot + i);
        const vec prod = v_mul(v, r), cross = v_mul(v, VP(permute)(r, 0xB1));  /* (a c, b s), (a s, b c) */
        const vec re = v_sub(prod, VP(permute)(prod, 0xB1)), im = v_add(cross, VP(permute)(cross, 0xB1));
#if LANES == 16
        const vec y = _mm512_mask_blend_ps(0xAAAA, re, im);  /* re in the even lanes, im in the odd */
#else
        const vec y = _mm256_blend_ps(re, im, 0xAA);
#endif
        if (bf16) v_store_upper_halves((uint16_t *)(out + i * bytes), v_round_bf16(y));
        else v_store((float *)(out + i * bytes), y);
    }
    return i;
}

/* e^x of LANES floats, x <= 0 or NaN (a score minus the largest): Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a
 * degree-6 polynomial in r, then 2^n), within 2 ulp of expf; below e^-87 (where expf's results are denormal, at
 * most 1e-38 of the largest term) the AVX2 width gives 0 */
static inline vec v_exp(vec x) {
    x = v_max(v_set1(LANES == 16 ? -110.0f : -88.0f), x);  /* (NaN stays NaN: max returns its second operand) */
    const vec n = v_round_int(v_mul(x, v_set1(1.44269504088896341f)));
    vec r = v_sub(x, v_mul(n, v_set1(0.693359375f)));
    r = v_sub(r, v_mul(n, v_set1(-2.12194440e-4f)));
    vec p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_scale2(p, n);
}

/* silu_one over n floats in place, LANES at a time: v_exp where every lane is within SILU_EXP_MAX (exp_poly's
 * operations, the same bits), else lane by lane */
static void silu_values(float *g, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vec x = v_load(g + i);
        if (!v_all_within(x, SILU_EXP_MAX)) {
            for (int j = 0; j < LANES; j++) g[i + j] = silu_one(g[i + j]);
            continue;
        }
        v_store(g + i, v_div(x, v_add(v_set1(1.0f), v_exp(v_mul(x, v_set1(-1.0f))))));
    }
    for (; i < n; i++) g[i] = silu_one(g[i]);
}

/* score[g * slots + j] = q_g . k[slot[j]] for the G <= GROUP heads g (q: G x d, fp32; or bf16 for qb) */
static inline __attribute__((always_inline)) void group_scores(const float *q, const uint16_t *qb,
                                                               const int64_t *slot, int64_t n, const char *k,
                                                               int64_t stride, const int bf16, int64_t d,
                                                               const int G, float *score, int64_t slots) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t j = 0; j < n; j++) {
        const char *row = k + slot[j] * stride;
        if (j + AHEAD < n)  /* the key AHEAD slots on: its row's lines */
            for (int64_t b = 0; b < d * size; b += 64) PREFETCH_ALWAYS(k + slot[j + AHEAD] * stride + b);
        vec acc[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = v_zero();
#if CPU_GEMV_BF16_DOT  /* (the build switch, not the run-time one: these sums are not in the pairs order) */
        if (bf16 && d % 32 == 0) {  /* 32 bf16 pairs a register: exact products, fp32 sums */
            for (int64_t i = 0; i < d; i += 32) {
                const __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(row + i * 2));
                for (int g = 0; g < G; g++)
                    acc[g] = _mm512_dpbf16_ps(acc[g], kv, (__m512bh)_mm512_loadu_si512((const void *)(qb + g * d + i)));
            }
        } else
#else
        (void)qb;
#endif
        {
            for (int64_t i = 0; i < d; i += LANES) {
                const vec kv = v_row(row + i * size, bf16);
                for (int g = 0; g < G; g++) acc[g] = v_fma(v_load(q + g * d + i), kv, acc[g]);
            }
        }
        float s[4];
        _mm_storeu_ps(s, hsum4(v_fold(acc[0]), v_fold(acc[1]), v_fold(acc[2]), v_fold(acc[3])));
        for (int g = 0; g < G; g++) score[g * slots + j] = s[g];
    }
}

/* group_scores with G and BF16 constants */
static void scores_of(const float *q, const uint16_t *qb, const int64_t *slot, int64_t n, const char *k,
                      int64_t stride, int bf16, int64_t d, int G, float *score, int64_t slots) {
#define SCORES(B, N) group_scores(q, qb, slot, n, k, stride, B, d, N, score, slots)
    if (bf16) {
        switch (G) { case 1: SCORES(1, 1); break; case 2: SCORES(1, 2); break; case 3: SCORES(1, 3); break;
                     default: SCORES(1, 4); }
    } else {
        switch (G) { case 1: SCORES(0, 1); break; case 2: SCORES(0, 2); break; case 3: SCORES(0, 3); break;
                     default: SCORES(0, 4); }
    }
#undef SCORES
}

/* the reference's softmax of one head's n scores: x = score * scale (bf16: each rounded, and so is x unless
 * scaled_fp32: latent attention's reference scales in fp32), then e^(x - max) / sum (bf16: rounded).  The scores
 * are read from `in` (bf16 if in_bf16, else fp32; may be p), p holds the n values meanwhile, and the probabilities
 * go to `out` (bf16 if out_bf16, else fp32; may be p or in) */
static inline __attribute__((always_inline)) void softmax_io(const void *in, const int in_bf16, float *p, void *out,
                                                             const int out_bf16, int64_t n, float scale,
                                                             const int bf16, const int scaled_fp32) {
    const vec sc = v_set1(scale);
    vec best = v_set1(-INFINITY);
    int nan = 0;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        vec x = in_bf16 ? v_row((const char *)in + j * 2, 1) : v_load((const float *)in + j);
        if (bf16 && !in_bf16) x = v_round_bf16(x);  /* (bf16 scores are bf16 values already) */
        x = bf16 && !scaled_fp32 ? v_round_bf16(v_mul(x, sc)) : v_mul(x, sc);
        v_store(p + j, x);
        best = v_max(best, x);
        nan |= v_any_nan(x);
    }
    float top = v_top(best);
    for (; j < n; j++) {
        const float score = value_at(in, j, in_bf16);
        float x = bf16 ? in_dtype(in_dtype(score, 1) * scale, !scaled_fp32) : score * scale;
        p[j] = x;
        top = x > top ? x : top;
        nan |= x != x;
    }
    if (nan) top = NAN;  /* a NaN score makes every probability NaN, as in the reference */
    const vec m = v_set1(top);
    vec total = v_zero();
    float tail = 0.0f;
    for (j = 0; j + LANES <= n; j += LANES) {
        const vec e = v_exp(v_sub(v_load(p + j), m));
        v_store(p + j, e);
        total = v_add(total, e);
    }
    if (j < n) {  /* the last n % LANES in one register (a lane's value does not depend on its neighbours) */
        float e[LANES] = {0};
        for (int64_t i = j; i < n; i++) e[i - j] = p[i] - top;
        v_store(e, v_exp(v_load(e)));
        for (int64_t i = j; i < n; i++) tail += p[i] = e[i - j];
    }
    const float s = v_sum(total) + tail;
    const vec sum = v_set1(s);
    for (j = 0; j + LANES <= n; j += LANES) {
        vec x = v_div(v_load(p + j), sum);
        x = bf16 ? v_round_bf16(x) : x;
        if (out_bf16) v_store_upper_halves((uint16_t *)out + j, x); else v_store((float *)out + j, x);
    }
    for (; j < n; j++) {
        const float x = in_dtype(p[j] / s, bf16);
        if (out_bf16) ((uint16_t *)out)[j] = float_to_bf16(x); else ((float *)out)[j] = x;
    }
}

/* softmax_io in place on fp32 scores */
static void softmax_row(float *p, int64_t n, float scale, const int bf16) {
    softmax_io(p, 0, p, p, 0, n, scale, bf16, 0);
}

/* y[g * d + c .. + LANES M) = sum_j prob[g * slots + j] v[slot[j]][c .. + LANES M) for the G heads; G, M (1 ..
 * VALUE_VECS) and BF16 are constants after inlining */
static inline __attribute__((always_inline)) void group_values(float *y, const float *prob, const int64_t *slot,
                                                               int64_t n, const char *v, int64_t stride,
                                                               const int bf16, int64_t d, const int G,
                                                               int64_t slots, const int M) {
    const int64_t size = bf16 ? 2 : 4;
    vec acc[GROUP][VALUE_VECS];
    for (int g = 0; g < GROUP; g++)
        for (int u = 0; u < M; u++) acc[g][u] = v_zero();
    for (int64_t j = 0; j < n; j++) {
        const char *row = v + slot[j] * stride;
        if (j + AHEAD < n)
            for (int u = 0; u < M; u++) PREFETCH_ALWAYS(v + slot[j + AHEAD] * stride + LANES * u * size);
        vec vv[VALUE_VECS];
        for (int u = 0; u < M; u++) vv[u] = v_row(row + LANES * u * size, bf16);
        for (int g = 0; g < G; g++) {
            const vec p = v_set1(prob[g * slots + j]);
            for (int u = 0; u < M; u++) acc[g][u] = v_fma(p, vv[u], acc[g][u]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int u = 0; u < M; u++) v_store(y + g * d + LANES * u, acc[g][u]);
}

static void group_values_all(float *y, const float *prob, const int64_t *slot, int64_t n, const char *v,
                             int64_t stride, const int bf16, int64_t d, int G, int64_t slots) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t c = 0; c < d; c += VALUE_VECS * LANES) {  /* VALUE_VECS registers of outputs a pass, then less */
        const int M = d - c >= VALUE_VECS * LANES ? VALUE_VECS : (int)((d - c) / LANES);
        float *yc = y + c;
        const char *vc = v + c * size;
#define VALUES(B, N, MM) group_values(yc, prob, slot, n, vc, stride, B, d, N, slots, MM)
#if VALUE_VECS == 4
#define VALUES_M(B, N) switch (M) { case 4: VALUES(B, N, 4); break; case 3: VALUES(B, N, 3); break; \
                                    case 2: VALUES(B, N, 2); break; default: VALUES(B, N, 1); }
#else
#define VALUES_M(B, N) switch (M) { case 2: VALUES(B, N, 2); break; default: VALUES(B, N, 1); }
#endif
#define VALUES_G(B) switch (G) { case 1: VALUES_M(B, 1) break; case 2: VALUES_M(B, 2) break; \
                                 case 3: VALUES_M(B, 3) break; default: VALUES_M(B, 4) }
        if (bf16) { VALUES_G(1) } else { VALUES_G(0) }
#undef VALUES_G
#undef VALUES_M
#undef VALUES
    }
}

/* attend_one's work after the slots each row sees are known (seen, count, blind): one task per (row, key / value
 * head, chunk of its query heads), chunks of GROUP heads, or fewer where that gives each thread a task */
static int attend_grouped(const void *q, const void *k, const void *v, const int64_t *seen, const int64_t *count,
                          const char *blind, void *out, int io_bf16, int64_t batch, int64_t slots, int64_t heads,
                          int64_t kv_heads, int64_t d, int threads) {
    const int64_t size = io_bf16 ? 2 : 4, rep = heads / kv_heads, stride = kv_heads * d * size;
    int64_t chunk = rep < GROUP ? rep : GROUP;
    while (chunk > 1 && batch * kv_heads * ((rep + chunk - 1) / chunk) < threads) chunk = (chunk + 1) / 2;
    const int64_t chunks = (rep + chunk - 1) / chunk, tasks = batch * kv_heads * chunks;
    const float scale = (float)pow((double)d, -0.5);
    const int64_t per_thread = GROUP * (slots + 3 * d);  /* probabilities, q in fp32, outputs, q in bf16 */
    float *buf = malloc((size_t)(threads * per_thread) * sizeof(float));
    if (!buf) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t b = t / (kv_heads * chunks), kh = t / chunks % kv_heads, h0 = kh * rep + t % chunks * chunk;
        const int G = (int)(rep - t % chunks * chunk < chunk ? rep - t % chunks * chunk : chunk);
        const int64_t *slot = seen + b * slots, n = count[b];
#ifdef _OPENMP
        float *prob = buf + omp_get_thread_num() * per_thread;
#else
        float *prob = buf;
#endif
        float *qf = prob + GROUP * slots, *y = qf + GROUP * d;
        uint16_t *qb = (uint16_t *)(y + GROUP * d);
        const int64_t first = (b * slots * kv_heads + kh) * d * size;  /* row b's slot 0, key / value head kh */
        const int64_t qfirst = (b * heads + h0) * d;
        for (int64_t i = 0; i < G * d; i++) qf[i] = value_at(q, qfirst + i, io_bf16);
        if (io_bf16) memcpy(qb, (const uint16_t *)q + qfirst, (size_t)(G * d) * sizeof(uint16_t));
        if (!blind[b]) {
            scores_of(qf, qb, slot, n, (const char *)k + first, stride, io_bf16, d, G, prob, slots);
            for (int g = 0; g < G; g++) softmax_row(prob + g * slots, n, scale, io_bf16);
        } else {  /* no key: the reference's softmax of `slots` equal scores, a uniform average of every slot */
            for (int g = 0; g < G; g++)
                for (int64_t j = 0; j < n; j++) prob[g * slots + j] = in_dtype(1.0f / (float)slots, io_bf16);
        }
        group_values_all(y, prob, slot, n, (const char *)v + first, stride, io_bf16, d, G, slots);
        for (int64_t i = 0; i < G * d; i++) {
            if (io_bf16) ((uint16_t *)out)[qfirst + i] = float_to_bf16(y[i]);
            else ((float *)out)[qfirst + i] = y[i];
        }
    }
    free(buf);
    return 0;
}
#endif

/* softmax_io value by value (builds without AVX2, head sizes the vector loops do not take): x = score * scale
 * (bf16: each rounded, x too unless scaled_fp32), then e^(x - max) by expf, divided by their sum (bf16: rounded) */
static void softmax_plain(float *p, int64_t n, float scale, int bf16, int scaled_fp32) {
    float best = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float x = bf16 ? in_dtype(in_dtype(p[j], 1) * scale, !scaled_fp32) : p[j] * scale;
        p[j] = x;
        best = j == 0 || x > best ? x : best;
    }
    for (int64_t j = 0; j < n; j++) total += p[j] = expf(p[j] - best);
    for (int64_t j = 0; j < n; j++) p[j] = in_dtype(p[j] / total, bf16);
}

/* attention.attention for T = 1:
 *     out[b, h] = sum_s softmax_s(q[b, h] . k[b, s, h / rep] * head_dim^-0.5) v[b, s, h / rep],  rep = heads / kv_heads
 * over the slots s whose position k_pos[b, s] the query at q_pos[b] sees (attention_mask: 0 <= k_pos <= q_pos,
 * and k_pos > q_pos - window unless window < 0); a query that sees none averages all `slots` values uniformly, as
 * the reference's softmax over equal masked scores does.  q (batch, heads, head_dim), k, v (batch, slots,
 * kv_heads, head_dim), out (batch, heads, head_dim): all bf16 (io_bf16) or fp32; k_pos (batch, slots), q_pos
 * (batch,) int64.  Rounded where the reference rounds in bf16: the product q . k, the scaled score, the
 * probabilities and the output (sums in fp32, in another order than the reference's).  Slots the query does not
 * see are skipped, not multiplied by zero: a step costs what the filled part of the cache holds.  The vector
 * loops (attend_grouped) where head_dim is a multiple of their register, else the plain ones a (row, head) at a
 * time; OpenMP over `threads`.  Returns 0, or -1 without memory. */
int attend_one(const void *q, const void *k, const void *v, const int64_t *k_pos, const int64_t *q_pos,
               int64_t window, void *out, int io_bf16, int64_t batch, int64_t slots, int64_t heads, int64_t kv_heads,
               int64_t head_dim, int threads) {
    const size_t size = io_bf16 ? sizeof(uint16_t) : sizeof(float);
    const int64_t rep = heads / kv_heads, pairs = batch * heads;
    threads = threads < 1 ? 1 : threads;
    if (pairs == 0) return 0;  /* no query: nothing to compute (and no zero-size allocation) */
    const float scale = (float)pow((double)head_dim, -0.5);
    /* per row: the slots its query sees (none: every slot, blind[b] = 1) */
    int64_t *seen = malloc((size_t)(batch * slots) * sizeof(int64_t)), *count = malloc((size_t)batch * sizeof(int64_t));
    char *blind = malloc((size_t)batch);
    if (!seen || !count || !blind) { free(seen); free(count); free(blind); return -1; }
    for (int64_t b = 0; b < batch; b++)
        count[b] = seen_slots(k_pos + b * slots, slots, q_pos[b], window, seen + b * slots, blind + b);
#if CPU_GEMV_AVX2
    if (head_dim % LANES == 0) {  /* the vector loops */
        int status = attend_grouped(q, k, v, seen, count, blind, out, io_bf16, batch, slots, heads, kv_heads,
                                    head_dim, threads);
        free(seen);
        free(count);
        free(blind);
        return status;
    }
#endif
    /* else plain loops, a (row, head) at a time; per thread: the scores, then probabilities, of the (row, head) it
     * is doing, its q and output in fp32 */
    const int64_t per_thread = slots + 2 * head_dim;
    float *buf = malloc((size_t)(threads * per_thread) * sizeof(float));
    if (!buf) { free(seen); free(count); free(blind); return -1; }
    const int64_t stride = kv_heads * head_dim * (int64_t)size;  /* bytes from one slot to the next */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < pairs; bh++) {
        const int64_t b = bh / heads, *slot = seen + b * slots, n = count[b];
#ifdef _OPENMP
        float *prob = buf + omp_get_thread_num() * per_thread;
#else
        float *prob = buf;
#endif
        float *qf = prob + slots, *y = qf + head_dim;
        const int64_t first = (b * slots * kv_heads + bh % heads / rep) * head_dim * (int64_t)size;
        for (int64_t i = 0; i < head_dim; i++) qf[i] = value_at(q, bh * head_dim + i, io_bf16);
        if (!blind[b]) {
            for (int64_t j = 0; j < n; j++) prob[j] = dot_key(qf, (const char *)k + first + slot[j] * stride, io_bf16, head_dim);
            softmax_plain(prob, n, scale, io_bf16, 0);
        } else {  /* no key: the reference's softmax of `slots` equal scores, a uniform average of every slot */
            for (int64_t j = 0; j < n; j++) prob[j] = in_dtype(1.0f / (float)slots, io_bf16);
        }
        weighted_values(y, prob, slot, n, (const char *)v + first, stride, io_bf16, head_dim);
        for (int64_t i = 0; i < head_dim; i++) {
            if (io_bf16) ((uint16_t *)out)[bh * head_dim + i] = float_to_bf16(y[i]);
            else ((float *)out)[bh * head_dim + i] = y[i];
        }
    }
    free(seen);
    free(count);
    free(blind);
    free(buf);
    return 0;
}


/* ---- latent attention of one query (a decode step of Mistral Small 4; backends/decode_step.py) --------------- */

static float dot_floats(const float *a, const float *b, int64_t n) {  /* 16 independent sums: vectorized */
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void to_floats(const void *x, int bf16, int64_t n, float *out) {  /* n values of x's dtype in fp32 */
    if (bf16)
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(((const uint16_t *)x)[i]);
    else
        memcpy(out, x, (size_t)n * sizeof(float));
}

/* row `row` of kv_b_proj's weight (rows x c) in fp32: its values (kind 0, x's dtype), or its codes dequantized as
 * QuantizedWeight.dequantize computes them, in fp32 and rounded to x's dtype: int8 (kind 1) times the row's scale,
 * int4 (kind 2, torch's CPU layout: int4_tail above) (code - 8) x scale + zero of its group of inputs */
static void kv_b_row(const void *w, const void *scales, int kind, int64_t group, int bf16, int64_t row, int64_t rows,
                     int64_t c, float *out) {
    if (kind == 1) {
        const int8_t *q = (const int8_t *)w + row * c;
        const float s = value_at(scales, row, bf16);
        for (int64_t i = 0; i < c; i++) out[i] = in_dtype((float)q[i] * s, bf16);
    } else if (kind == 2) {
        /* a block of 32 rows holds, for each input, 16 bytes: low nibbles rows 0..15, high ones 16..31; the last 16
         * rows 8 bytes: (0, 1), (2, 3), ... as (low, high) */
        const int64_t full = rows / 32 * 32, j = row - full;
        const uint8_t *p = (const uint8_t *)w + (row < full ? row / 32 * c * 16 + row % 16 : full * c / 2 + j / 2);
        const int64_t stride = row < full ? 16 : 8;
        const int shift = (row < full ? row % 32 >= 16 : j % 2) ? 4 : 0;
        for (int64_t g = 0; g < c / group; g++) {
            const int64_t k = (g * rows + row) * 2;  /* (scale, zero) of the group and row */
            const float s = value_at(scales, k, bf16), z = value_at(scales, k + 1, bf16);
            for (int64_t i = g * group; i < (g + 1) * group; i++) {
                const float v = (float)((p[i * stride] >> shift) & 15) - 8.0f;
                out[i] = in_dtype(v * s + z, bf16);
            }
        }
    } else {
        to_floats((const char *)w + row * c * (bf16 ? 2 : 4), bf16, c, out);
    }
}

/* mla.latent_attention for one query, absorbed into latent space as backends/mla.py computes it, in fp32:
 *     q_latent[h] = W_UK[h]^T q_nope[h]                              (c,)  W_UK[h]: kv_b rows h (n + v) + [0, n)
 *     score[h, s] = (q_latent[h] . latent[s] + q_rope[h] . k_rope[s]) * scale
 *     out[h]      = W_UV[h] sum_s softmax_s(score[h, s]) latent[s]   (v,)  W_UV[h]: kv_b rows h (n + v) + [n, n + v)
 * over the slots whose position k_pos[s] the query at q_pos sees (seen_slots, no window).  q (heads, n + r): each
 * head's q_nope | q_rope; latents (slots, c) and k_rope (slots, r): a row's latent cache; kv_b (heads (n + v), c):
 * of x's dtype (kv_b_kind 0), or int8 codes (1) or int4 ones in groups of kv_b_group inputs (2) with kv_b_scales of
 * x's dtype; all of x's dtype (io_bf16: bf16, else fp32); out (heads, v) rounded to x's dtype.  `rounded` (bf16
 * only): each product rounded to bf16 as PyTorch's bf16 einsums round them on a CPU with bf16 instructions
 * (backends/mla.py computes in bf16 there): q_latent, both parts of a score and their sum, the probabilities and
 * out_latent.  Heads split among `threads`, each thread reading every cached row once for all its heads (no copy
 * of the cache: a long one costs only its scores).  Returns 0, or -1 without memory. */
int attend_latent_one(const void *q, const void *latents, const void *k_rope, const int64_t *k_pos, int64_t q_pos,
                      const void *kv_b, int kv_b_kind, const void *kv_b_scales, int64_t kv_b_group, void *out,
                      int io_bf16, int rounded, int64_t slots, int64_t heads, int64_t n, int64_t r, int64_t v,
                      int64_t c, float scale, int threads) {
    const int rb = rounded && io_bf16;
    const int64_t rows = heads * (n + v);  /* kv_b's */
    const size_t size = io_bf16 ? sizeof(uint16_t) : sizeof(float);
    threads = threads < 1 ? 1 : threads;
    if (heads == 0 || slots == 0) return 0;
    int64_t *seen = malloc((size_t)slots * sizeof(int64_t));
    if (!seen) return -1;
    char blind;
    const int64_t count = seen_slots(k_pos, slots, q_pos, -1, seen, &blind);  /* (latent attention: no window) */
    const int team = count * heads * c > 65536 ? threads : 1;  /* a short cache: one thread */
    int failed = 0;
    #pragma omp parallel num_threads(team) reduction(|:failed)
    {
        /* this thread's heads [h0, h1): each one's q_latent, q_rope, out_latent and scores; a key's row in fp32 and
         * a row of kv_b.  Each cached row is read once for all of them. */
        int64_t h0, h1;
        thread_share(heads, &h0, &h1);
        const int64_t m = h1 - h0;
        float *buf = m ? malloc((size_t)(m * (2 * c + r + count) + 2 * c + r) * sizeof(float)) : NULL;
        if (m && !buf) failed = 1;
        if (buf) {
            float *ql = buf, *qr = ql + m * c, *ol = qr + m * r, *prob = ol + m * c, *key = prob + m * count;
            float *row = key + c + r;
            for (int64_t h = h0; h < h1; h++) {  /* the queries moved into latent space */
                float *qh = ql + (h - h0) * c;
                memset(qh, 0, (size_t)c * sizeof(float));
                for (int64_t i = 0; i < n; i++) {
                    const float qi = value_at(q, h * (n + r) + i, io_bf16);
                    kv_b_row(kv_b, kv_b_scales, kv_b_kind, kv_b_group, io_bf16, h * (n + v) + i, rows, c, row);
                    for (int64_t t = 0; t < c; t++) qh[t] += qi * row[t];
                }
                if (rb)
                    for (int64_t t = 0; t < c; t++) qh[t] = in_dtype(qh[t], 1);
                for (int64_t i = 0; i < r; i++) qr[(h - h0) * r + i] = value_at(q, h * (n + r) + n + i, io_bf16);
            }
            for (int64_t j = 0; j < count && !blind; j++) {  /* the scores */
                to_floats((const char *)latents + seen[j] * c * size, io_bf16, c, key);
                to_floats((const char *)k_rope + seen[j] * r * size, io_bf16, r, key + c);
                for (int64_t h = 0; h < m; h++) {
                    const float nope = dot_floats(ql + h * c, key, c), rope = dot_floats(qr + h * r, key + c, r);
                    const float sum = rb ? in_dtype(in_dtype(nope, 1) + in_dtype(rope, 1), 1) : nope + rope;
                    prob[h * count + j] = sum * scale;
                }
            }
            for (int64_t h = 0; h < m; h++) {  /* softmax (no key: a uniform average of every slot) */
                float *p = prob + h * count, top = -INFINITY, total = 0.0f;
                if (blind) {
                    for (int64_t j = 0; j < count; j++) p[j] = in_dtype(1.0f / (float)count, rb);
                    continue;
                }
                for (int64_t j = 0; j < count; j++) top = p[j] > top ? p[j] : top;
                for (int64_t j = 0; j < count; j++) total += p[j] = expf(p[j] - top);
                for (int64_t j = 0; j < count; j++) p[j] = in_dtype(p[j] / total, rb);
            }
            memset(ol, 0, (size_t)(m * c) * sizeof(float));
            for (int64_t j = 0; j < count; j++) {  /* the probabilities' sum of latents */
                to_floats((const char *)latents + seen[j] * c * size, io_bf16, c, key);
                for (int64_t h = 0; h < m; h++) {
                    const float p = prob[h * count + j];
                    float *oh = ol + h * c;
                    for (int64_t t = 0; t < c; t++) oh[t] += p * key[t];
                }
            }
            for (int64_t h = h0; h < h1; h++) {  /* back out of latent space */
                float *oh = ol + (h - h0) * c;
                if (rb)
                    for (int64_t t = 0; t < c; t++) oh[t] = in_dtype(oh[t], 1);
                for (int64_t i = 0; i < v; i++) {
                    kv_b_row(kv_b, kv_b_scales, kv_b_kind, kv_b_group, io_bf16, h * (n + v) + n + i, rows, c, row);
                    const float y = dot_floats(row, oh, c);
                    if (io_bf16) ((uint16_t *)out)[h * v + i] = float_to_bf16(y); else ((float *)out)[h * v + i] = y;
                }
            }
            free(buf);
        }
    }
    free(seen);
    return failed ? -1 : 0;
}

/* attention.attention's softmax for a prompt that attends to itself (causal, within `window` positions if >= 1),
 * for a block of its queries whose scores the caller has computed (backends/prompt_attention.py, one batched GEMM):
 * scores (groups, rows, cols), bf16 (io_bf16) or fp32, row r holding the query at position first + r % n against
 * the keys at positions 0 .. cols - 1 (positions counted from the block's first key; rows = query heads x n,
 * cols = first + n).  That query, at q = first + r % n, sees keys max(0, q - window + 1) .. q: probs (same shape
 * and dtype; may be scores) gets softmax(score * scale) over them, rounded where the reference rounds
 * (softmax_io; scaled_fp32: as mla.latent_attention, the scaled scores not rounded), and 0 for the keys it does
 * not see.  Rows are shared among `threads`.  Returns 0, or -1 without memory. */
int softmax_causal(const void *scores, void *probs, int io_bf16, int64_t groups, int64_t rows, int64_t cols,
                   int64_t n, int64_t first, int64_t window, float scale, int scaled_fp32, int threads) {
    const int64_t size = io_bf16 ? 2 : 4, total = groups * rows;
    threads = threads < 1 ? 1 : threads;
    if (total == 0 || cols == 0) return 0;
    float *buf = malloc((size_t)(threads * cols) * sizeof(float));
    if (!buf) return -1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < total; t++) {
#ifdef _OPENMP
        float *p = buf + omp_get_thread_num() * cols;
#else
        float *p = buf;
#endif
        const int64_t q = first + t % rows % n, lo = window >= 1 && q - window + 1 > 0 ? q - window + 1 : 0;
        const int64_t seen = q + 1 - lo;  /* keys lo .. q */
        const char *in = (const char *)scores + (t * cols + lo) * size;
        char *out = (char *)probs + (t * cols + lo) * size;
        memset(out - lo * size, 0, (size_t)lo * (size_t)size);  /* (before reading: in may be out) */
#if CPU_GEMV_AVX2
        if (io_bf16 && scaled_fp32) softmax_io(in, 1, p, out, 1, seen, scale, 1, 1);
        else if (io_bf16) softmax_io(in, 1, p, out, 1, seen, scale, 1, 0);
        else softmax_io(in, 0, p, out, 0, seen, scale, 0, 0);
#else
        for (int64_t j = 0; j < seen; j++) p[j] = value_at(in, j, io_bf16);
        softmax_plain(p, seen, scale, io_bf16, scaled_fp32);
        for (int64_t j = 0; j < seen; j++)
            if (io_bf16) ((uint16_t *)out)[j] = float_to_bf16(p[j]); else ((float *)out)[j] = p[j];
#endif
        memset(out + seen * size, 0, (size_t)(cols - lo - seen) * (size_t)size);
    }
    free(buf);
    return 0;
}

#if !CPU_GEMV_AVX2
static void silu_values(float *g, int64_t n) {  /* (builds without AVX2: silu_one value by value) */
    for (int64_t i = 0; i < n; i++) g[i] = silu_one(g[i]);
}
#endif

#if CPU_GEMV_AVX2
/* norm_row's out[r] = weight * round(x[r] * scale) for the first dim / LANES * LANES values, LANES at a time: the
 * same operations and roundings as its scalar loop, the same bits; returns how many it did */
static int64_t norm_scale_vec(const void *x, const void *weight, void *out, int io_bf16, int64_t r, int64_t dim,
                              float scale) {
    const int64_t size = io_bf16 ? 2 : 4;
    const vec sc = v_set1(scale);
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES) {
        const vec xv = v_row((const char *)x + (r * dim + d) * size, io_bf16);
        const vec normed = io_bf16 ? v_round_bf16(v_mul(xv, sc)) : v_mul(xv, sc);
        const vec y = v_mul(v_row((const char *)weight + d * size, io_bf16), normed);
        if (io_bf16) v_store_upper_halves((uint16_t *)out + r * dim + d, v_round_bf16(y));
        else v_store((float *)out + r * dim + d, y);
    }
    return d;
}
#endif

/* silu_mul's values c .. c + m - 1 (m <= SILU_CHUNK; s: room for m floats): the gate's values into s, silu_values,
 * then times up, each rounded to x's dtype: LANES at a time where the build has the vector loops, the same
 * operations and bits as value by value */
static void silu_mul_chunk(const void *gate, const void *up, void *out, int io_bf16, int64_t c, int64_t m,
                           float *s) {
    int64_t j = 0;
#if CPU_GEMV_AVX2
    const int64_t size = io_bf16 ? 2 : 4;
    for (; j + LANES <= m; j += LANES) v_store(s + j, v_row((const char *)gate + (c + j) * size, io_bf16));
#endif
    for (; j < m; j++) s[j] = value_at(gate, c + j, io_bf16);
    silu_values(s, m);
    j = 0;
#if CPU_GEMV_AVX2
    for (; j + LANES <= m; j += LANES) {
        const vec u = v_row((const char *)up + (c + j) * size, io_bf16);
        if (io_bf16)
            v_store_upper_halves((uint16_t *)out + c + j, v_round_bf16(v_mul(v_round_bf16(v_load(s + j)), u)));
        else
            v_store((float *)out + c + j, v_mul(v_load(s + j), u));
    }
#endif
    for (; j < m; j++) {
        const float v = in_dtype(in_dtype(s[j], io_bf16) * value_at(up, c + j, io_bf16), io_bf16);
        if (io_bf16) ((uint16_t *)out)[c + j] = float_to_bf16(v); else ((float *)out)[c + j] = v;
    }
}

/* ---- a prompt's experts on AMX tiles (backends/moe.py: mix_experts_grouped, cpu_gemv.py: experts_rows) ---------
 *
 * Every expert's SwiGLU over the rows routed to it, in one call: for expert e and its n rows X (the rows `token`
 * names, n, dim), gate = X W1_e.T, up = X W3_e.T, h = silu(gate) * up, Y = h W2_e.T, each rounded to bf16 as the
 * reference rounds them (moe.swiglu; the products' fp32 sums in the tiles' order).  A Python loop over the experts
 * costs a few calls of ~20 us each an expert (and oneDNN's fixed cost per call); with many small experts (Mistral
 * Small 4: 128 of them) that is most of a prefill.  Here the threads take an expert's rows AMX_CHUNK at a time.
 *
 * The tiles multiply W (16 rows of 32 bf16: read from the weight as it is) by the rows of X turned into pairs:
 * for each block of 16 rows, a (k32 / 2, 16) array of 32-bit words, word (i, t) = inputs 2i, 2i + 1 of row t,
 * zero past the last input (k32: k rounded up to 32; W's last k % 32 inputs are copied into a zero-padded tile).
 * So each product gives its result transposed, a block of 16 rows at a time, (blocks, out, 16): h's transpose is
 * put into pairs for the product by W2 by interleaving its rows 2i and 2i + 1, and Y's is transposed back as it is
 * rounded.  Four sums a step: two tiles of W by two blocks of rows.  Weights need out % 16 == 0 and an even in. */
#if CPU_GEMV_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define CPU_GEMV_AMX 1
#include <sys/syscall.h>
extern long syscall(long number, ...);
#ifndef SYS_arch_prctl
#define SYS_arch_prctl 158
#endif
#else
#define CPU_GEMV_AMX 0
#endif
#define AMX_CHUNK 256  /* rows of one expert a thread takes at a time (its buffers: ~AMX_CHUNK x (2 hidden + dim)) */

/* 1 if this build has the AMX kernels and the kernel lets this process use the tiles (asked once: Linux's
 * ARCH_REQ_XCOMP_PERM for XTILEDATA; oneDNN asks the same), else 0 */
int cpu_gemv_amx(void) {
#if CPU_GEMV_AMX
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return permitted;
#else
    return 0;
#endif
}

#if CPU_GEMV_AMX
typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* eight tiles of 16 rows of 64 bytes: 0-3 fp32 sums, 4-5 rows of W, 6-7 blocks of pairs */
static void amx_configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* In a thread's loop over AMX work items: 0 (and *failed set) where the thread's buffers could not be allocated;
 * else 1, the tiles configured at the thread's first item */
static inline int amx_item(int ok, int *configured, int *failed) {
    if (!ok) {
        #pragma omp atomic write
        *failed = 1;
        return 0;
    }
    if (!*configured) amx_configure(), *configured = 1;
    return 1;
}

/* ct (blocks, out, 16) fp32: block b's rows times W (out, k) bf16, from the pairs bp (blocks, k32 / 2, 16) words.
 * tail: room for 32 x 32 bf16 (W's last k % 32 inputs of 32 rows, zero-padded) */
static void amx_product(const uint16_t *w, int64_t out, int64_t k, const uint32_t *bp, int64_t blocks, float *ct,
                        uint16_t *tail) {
    const int64_t k32 = (k + 31) / 32 * 32, whole = k / 32 * 32, stride = k * 2;
    for (int64_t o = 0; o < out; o += 32) {
        const int two_o = o + 32 <= out;
        if (whole < k) {
            memset(tail, 0, 32 * 32 * sizeof(uint16_t));
            for (int64_t r = 0; r < (two_o ? 32 : 16); r++)
                memcpy(tail + r * 32, w + (o + r) * k + whole, (size_t)(k - whole) * sizeof(uint16_t));
        }
        for (int64_t b = 0; b < blocks; b += 2) {
            const int two_b = b + 2 <= blocks;
            const uint32_t *b0 = bp + b * (k32 / 2) * 16, *b1 = b0 + (k32 / 2) * 16;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t i = 0; i < k32; i += 32) {
                const uint16_t *a = i < whole ? w + o * k + i : tail;
                const int64_t as = i < whole ? stride : 64;
                _tile_loadd(4, a, as);
                _tile_loadd(6, b0 + i / 2 * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (two_b) { _tile_loadd(7, b1 + i / 2 * 16, 64); _tile_dpbf16ps(1, 4, 7); }
                if (two_o) {
                    _tile_loadd(5, a + 16 * (as / 2), as);
                    _tile_dpbf16ps(2, 5, 6);
                    if (two_b) _tile_dpbf16ps(3, 5, 7);
                }
            }
            float *c0 = ct + (b * out + o) * 16, *c1 = c0 + out * 16;
            _tile_stored(0, c0, 64);
            if (two_b) _tile_stored(1, c1, 64);
            if (two_o) {
                _tile_stored(2, c0 + 16 * 16, 64);
                if (two_b) _tile_stored(3, c1 + 16 * 16, 64);
            }
        }
    }
}

/* the 16 x 16 32-bit words of r, transposed in place */
static inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int j = 0; j < 8; j++) {
        a[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        a[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) {  /* lane L of b[4j + m]: column 4L + m of rows 4j .. 4j + 3 */
        b[4 * j] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
        b[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
    }
    for (int m = 0; m < 4; m++) {
        const __m512i e0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x44), e1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xee);
        const __m512i f0 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x44);
        const __m512i f1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xee);
        r[m] = _mm512_shuffle_i32x4(e0, f0, 0x88), r[4 + m] = _mm512_shuffle_i32x4(e0, f0, 0xdd);
        r[8 + m] = _mm512_shuffle_i32x4(e1, f1, 0x88), r[12 + m] = _mm512_shuffle_i32x4(e1, f1, 0xdd);
    }
}

/* n <= AMX_CHUNK rows of one expert (x's rows token[0 .. n)) -> y (n, dim) bf16, with the buffers experts_amx
 * gives each thread */
static void expert_amx(const uint16_t *x, const int64_t *token, int64_t n, const uint16_t *w1, const uint16_t *w3,
                       const uint16_t *w2, int64_t hidden, int64_t dim, uint16_t *y, uint32_t *xp, uint32_t *hp,
                       float *gate, float *up, float *yt, uint16_t *tail) {
    const int64_t blocks = (n + 15) / 16, half = dim / 2, dim32 = (dim + 31) / 32 * 32;
    const int64_t hidden32 = (hidden + 31) / 32 * 32;
    for (int64_t b = 0; b < blocks; b++) {  /* X in pairs, 16 rows a block (the padding rows: zero) */
        int32_t at[16];
        __mmask16 live = 0;
        for (int t = 0; t < 16; t++)
            if (b * 16 + t < n) at[t] = (int32_t)(token[b * 16 + t] * half), live |= (__mmask16)(1u << t);
            else at[t] = 0;
        const __m512i idx = _mm512_loadu_si512((const void *)at);
        uint32_t *block = xp + b * (dim32 / 2) * 16;
        for (int64_t i = 0; i < half; i++)
            _mm512_storeu_si512((void *)(block + i * 16),
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx,
                                                            (const void *)((const uint32_t *)x + i), 4));
        memset(block + half * 16, 0, (size_t)(dim32 / 2 - half) * 16 * sizeof(uint32_t));
    }
    amx_product(w1, hidden, dim, xp, blocks, gate, tail);  /* (blocks, hidden, 16) */
    amx_product(w3, hidden, dim, xp, blocks, up, tail);
    const int64_t values = blocks * hidden * 16;  /* h = silu(gate) * up, rounded as silu_mul rounds it */
    for (int64_t j = 0; j < values; j += 16) v_store(gate + j, v_round_bf16(v_load(gate + j)));
    silu_values(gate, values);
    for (int64_t j = 0; j < values; j += 16)
        v_store(gate + j, v_round_bf16(v_mul(v_round_bf16(v_load(gate + j)), v_round_bf16(v_load(up + j)))));
    for (int64_t b = 0; b < blocks; b++) {  /* h's transpose in pairs: rows 2i and 2i + 1 interleaved */
        const float *h = gate + b * hidden * 16;
        uint32_t *block = hp + b * (hidden32 / 2) * 16;
        for (int64_t i = 0; i < hidden / 2; i++) {
            const __m512i lo = _mm512_castps_si512(v_load(h + 2 * i * 16));
            const __m512i hi = _mm512_castps_si512(v_load(h + (2 * i + 1) * 16));
            _mm512_storeu_si512((void *)(block + i * 16),
                                _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32((int)0xffff0000u)),
                                                _mm512_srli_epi32(lo, 16)));
        }
        memset(block + hidden / 2 * 16, 0, (size_t)(hidden32 / 2 - hidden / 2) * 16 * sizeof(uint32_t));
    }
    amx_product(w2, dim, hidden, hp, blocks, yt, tail);  /* (blocks, dim, 16) */
    for (int64_t b = 0; b < blocks; b++)  /* Y: 16 x 16 words transposed, rounded, a row's 16 outputs stored */
        for (int64_t o = 0; o < dim; o += 16) {
            __m512i r[16];
            for (int j = 0; j < 16; j++)
                r[j] = _mm512_castps_si512(v_round_bf16(v_load(yt + (b * dim + o + j) * 16)));
            transpose16(r);
            for (int t = 0; t < 16 && b * 16 + t < n; t++)
                _mm256_storeu_si256((__m256i *)(y + (b * 16 + t) * dim + o),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(r[t], 16)));
        }
}
#endif

/* The experts' SwiGLUs of a prompt's routed rows: expert e takes counts[e] rows, those of x (tokens, dim) bf16
 * that token[start_e ..] names (start_e: the counts of the experts before it), and writes them to y's rows start_e
 * .. start_e + counts[e] - 1 (y: (sum of counts, dim) bf16).  w1[e], w3[e] (hidden, dim) and w2[e] (dim, hidden):
 * each expert's bf16 weights, row-major.  Needs hidden and dim multiples of 16 and x's tokens x dim / 2 below
 * 2^31 (cpu_gemv.py checks).  Returns 0; -1 without memory; -3 where this build or process has no AMX tiles. */
int experts_amx(const uint16_t *x, const int64_t *token, const int64_t *counts, int64_t n_experts,
                const void *const *w1, const void *const *w3, const void *const *w2, int64_t hidden, int64_t dim,
                uint16_t *y, int threads) {
#if CPU_GEMV_AMX
    if (!cpu_gemv_amx() || hidden % 16 || dim % 16) return -3;
    int64_t items = 0, total = 0;
    for (int64_t e = 0; e < n_experts; e++) items += (counts[e] + AMX_CHUNK - 1) / AMX_CHUNK;
    int64_t *item = malloc((size_t)(2 * (items > 0 ? items : 1)) * sizeof(int64_t));  /* (expert, first row) */
    if (!item) return -1;
    for (int64_t e = 0, j = 0; e < n_experts; total += counts[e], e++)
        for (int64_t r = 0; r < counts[e]; r += AMX_CHUNK) item[2 * j] = e, item[2 * j + 1] = total + r, j++;
    int64_t *start = malloc((size_t)(n_experts > 0 ? n_experts : 1) * sizeof(int64_t));
    if (!start) { free(item); return -1; }
    for (int64_t e = 0, at = 0; e < n_experts; at += counts[e], e++) start[e] = at;
    const int64_t dim32 = (dim + 31) / 32 * 32, hidden32 = (hidden + 31) / 32 * 32, rows = AMX_CHUNK;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *xp = malloc((size_t)(dim32 / 2 * rows) * 4), *hp = malloc((size_t)(hidden32 / 2 * rows) * 4);
        float *gate = malloc((size_t)(hidden * rows) * 4), *up = malloc((size_t)(hidden * rows) * 4);
        float *yt = malloc((size_t)(dim * rows) * 4);
        uint16_t *tail = malloc(32 * 32 * sizeof(uint16_t));
        const int ok = xp && hp && gate && up && yt && tail;
        int configured = 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < items; j++) {
            if (!amx_item(ok, &configured, &failed)) continue;
            const int64_t e = item[2 * j], first = item[2 * j + 1], end = start[e] + counts[e];
            const int64_t n = end - first < AMX_CHUNK ? end - first : AMX_CHUNK;
            expert_amx(x, token + first, n, (const uint16_t *)w1[e], (const uint16_t *)w3[e],
                       (const uint16_t *)w2[e], hidden, dim, y + first * dim, xp, hp, gate, up, yt, tail);
        }
        if (configured) _tile_release();
        free(xp), free(hp), free(gate), free(up), free(yt), free(tail);
    }
    free(item), free(start);
    return failed ? -1 : 0;
#else
    (void)x, (void)token, (void)counts, (void)n_experts, (void)w1, (void)w3, (void)w2, (void)hidden, (void)dim;
    (void)y, (void)threads;
    return -3;
#endif
}

/* ---- products of a few hundred rows on AMX tiles (backends/linear.py: linear, cpu_gemv.py: linear_amx) ---------
 *
 * y (rows, out) = x (rows, in) @ W (out, in).T, all bf16: fp32 sums in the tiles' order, each rounded once to bf16
 * (as F.linear rounds its fp32 sums; the order differs).  Threads take the output's columns 32 at a time.  For each
 * block of 32 columns and AMX_LINEAR_KC inputs, a thread puts the weight's rows into tiles of input pairs (word
 * (i, o) = inputs 2i, 2i + 1 of column o: a 16 x 16 transpose of 32-bit words), which stay in L1 while every block
 * of 32 rows multiplies by them; x's rows are read as they lie (a tile: 16 rows of 32 inputs), AMX_LINEAR_ROWS
 * rows at a time, the last block of fewer than 32 through a zero-padded copy.  A block's sums pass from one chunk of
 * inputs to the next in a per-thread buffer.  Four sums a step: two tiles of rows by two of columns.  Needs in and
 * out multiples of 32 (cpu_gemv.py checks). */
#define AMX_LINEAR_KC 256  /* inputs a chunk: the chunk's tiles of the weight, 16 KB, stay in L1 */
#define AMX_LINEAR_ROWS 512  /* rows a pass over the weight (their sums: 64 KB a thread) */
#if CPU_GEMV_AMX
/* the 32 columns c0 .. c0 + 31 of W, inputs i0 .. i0 + 32 steps - 1, as tiles of pairs: bp[g][step] (16 x 16 words) */
static void linear_pack(const uint16_t *w, int64_t in, int64_t c0, int64_t i0, int64_t steps, uint32_t *bp) {
    for (int g = 0; g < 2; g++)
        for (int64_t st = 0; st < steps; st++) {
            __m512i r[16];
            const uint16_t *src = w + (c0 + 16 * g) * in + i0 + st * 32;
            for (int t = 0; t < 16; t++) r[t] = _mm512_loadu_si512((const void *)(src + t * in));
            transpose16(r);
            uint32_t *dst = bp + (g * (AMX_LINEAR_KC / 32) + st) * 256;
            for (int m = 0; m < 16; m++) _mm512_storeu_si512((void *)(dst + m * 16), r[m]);
        }
}
#endif

/* y (rows, out) = x (rows, in) @ w (out, in).T, bf16, row-major.  Returns 0; -1 without memory; -3 where this build
 * or process has no AMX tiles or in, out are not multiples of 32. */
int linear_amx(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t in, int64_t out,
               int threads) {
#if CPU_GEMV_AMX
    if (!cpu_gemv_amx() || in % 32 || out % 32) return -3;
    const int64_t steps = in / 32, chunk = AMX_LINEAR_KC / 32, columns = out / 32;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *bp = malloc(2 * AMX_LINEAR_KC / 32 * 1024);  /* a chunk's tiles of the weight */
        float *sums = malloc((size_t)AMX_LINEAR_ROWS * 32 * sizeof(float));  /* a pass's blocks of 32 x 32 sums */
        uint16_t *pad = malloc((size_t)(32 * in) * 2);  /* the last block's rows, zero-padded to 32 */
        int configured = 0;
        #ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        #else
        const int64_t t = 0, nt = 1;
        #endif
        const int64_t c_lo = columns * t / nt, c_hi = columns * (t + 1) / nt;  /* this thread's blocks of columns */
        if (c_lo < c_hi && amx_item(bp && sums && pad, &configured, &failed)) {
            for (int64_t r0 = 0; r0 < rows; r0 += AMX_LINEAR_ROWS) {
                const int64_t n = rows - r0 < AMX_LINEAR_ROWS ? rows - r0 : AMX_LINEAR_ROWS;
                const int64_t blocks = (n + 31) / 32, tail = n % 32;
                if (tail) {
                    memset(pad, 0, (size_t)(32 * in) * 2);
                    memcpy(pad, x + (r0 + (blocks - 1) * 32) * in, (size_t)(tail * in) * 2);
                }
                for (int64_t c = c_lo; c < c_hi; c++)
                    for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
                        const int64_t ns = steps - s0 < chunk ? steps - s0 : chunk;
                        const int first = s0 == 0, last = s0 + ns == steps;
                        linear_pack(w, in, c * 32, s0 * 32, ns, bp);
                        for (int64_t b = 0; b < blocks; b++) {
                            const uint16_t *xb = tail && b == blocks - 1 ? pad : x + (r0 + b * 32) * in;
                            float *sb = sums + b * 32 * 32;  /* 32 rows x 32 columns */
                            if (first) {
                                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                            } else {
                                _tile_loadd(0, sb, 128); _tile_loadd(1, sb + 16, 128);
                                _tile_loadd(2, sb + 512, 128); _tile_loadd(3, sb + 512 + 16, 128);
                            }
                            for (int64_t st = 0; st < ns; st++) {
                                const uint16_t *a = xb + (s0 + st) * 32;
                                _tile_loadd(4, a, in * 2);
                                _tile_loadd(6, bp + st * 256, 64);
                                _tile_dpbf16ps(0, 4, 6);
                                _tile_loadd(7, bp + (chunk + st) * 256, 64);
                                _tile_dpbf16ps(1, 4, 7);
                                _tile_loadd(5, a + 16 * in, in * 2);
                                _tile_dpbf16ps(2, 5, 6);
                                _tile_dpbf16ps(3, 5, 7);
                            }
                            _tile_stored(0, sb, 128); _tile_stored(1, sb + 16, 128);
                            _tile_stored(2, sb + 512, 128); _tile_stored(3, sb + 512 + 16, 128);
                            if (last) {  /* the block's rows, rounded to bf16 (round to nearest even) */
                                const int64_t live = tail && b == blocks - 1 ? tail : 32;
                                for (int64_t r = 0; r < live; r++)
                                    _mm512_storeu_si512((void *)(y + (r0 + b * 32 + r) * out + c * 32),
                                                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sb + r * 32 + 16),
                                                                                     _mm512_loadu_ps(sb + r * 32)));
                            }
                        }
                    }
            }
        }
        if (configured) _tile_release();
        free(bp), free(sums), free(pad);
    }
    return failed ? -1 : 0;
#else
    (void)x, (void)w, (void)y, (void)rows, (void)in, (void)out, (void)threads;
    return -3;
#endif
}

/* ---- a prompt's causal attention on AMX tiles (backends/prompt_attention.py, cpu_gemv.py: prompt_attention_amx) ---
 *
 * Flash attention (Dao et al. 2022) with the tiles, transposed: for each query head and block of 32 queries (two groups
 * of 16), the keys they see 32 at a time, as the scores' transpose S.T = K Q.T (32 keys x 16 queries a group, fp32 sums
 * of bf16 products), so that every query's running maximum m and sum l are a vector register's lanes and need no
 * horizontal reduction; P.T = 2^(S.T scale log2(e) - m) rounded to bf16, the output's transpose O.T = O.T 2^(m_old - m)
 * + V.T P.T (fp32), and at the end O = (O.T / l).T rounded to bf16.  So its roundings are those of a fused kernel (as
 * SDPA's), not the reference's (scores rounded to bf16, probabilities normalized before their rounding): within bf16
 * rounding of attention.attention, tested.  Once a call: K copied with its rows padded to a multiple of 32 keys, V
 * transposed in blocks of 32 keys (V.T: a head's columns, each over the block's keys, so that a step's tiles of V.T are
 * one contiguous block); each block's queries into pairs of inputs (16 x 16 words transposed at a time).  2^x: a degree-3
 * polynomial on [0, 1) (within 7.5e-5 of it; P.T is rounded to bf16's 2^-9 anyway) times 2^floor(x), x clamped at -125
 * (below: 0 within fp32); a NaN score (a NaN in q or k) makes its query's output NaN, as in the reference, and a key no
 * query of the block sees is never used (masked to 0 in steps that a block's queries see only in part). */
#define ATT_KEYS 32  /* keys a step */
#define ATT_SLOTS 8  /* steps whose P.T goes into O.T together (one load and store of O.T's tiles) */
#if CPU_GEMV_AMX
static inline __m512 exp2_vec(__m512 x) {
    /* x >= -125: no denormal result (slow), p(0) being below 1 (NaN stays NaN: max returns its second operand) */
    x = _mm512_max_ps(_mm512_set1_ps(-125.0f), x);
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  /* x - floor(x) in one step */
    __m512 p = _mm512_set1_ps(0.07802452147006989f);  /* the minimax cubic of 2^f's relative error (Remez) */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606715559959412f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958335638046265f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999251961708069f));
    return _mm512_scalef_ps(p, x);  /* p 2^floor(x) */
}

/* the queries of a block (lane r: position first + r, r < n) that see key `key` */
static inline __mmask16 seeing(int64_t key, int64_t first, int64_t n, int64_t window) {
    const int64_t lo = key - first > 0 ? key - first : 0;  /* lanes r with first + r >= key ... */
    int64_t hi = n - 1;  /* ... and first + r - window + 1 <= key */
    if (window > 0 && key + window - 1 - first < hi) hi = key + window - 1 - first;
    if (lo > hi) return 0;
    return (__mmask16)(((1u << (hi + 1)) - 1) & ~((1u << lo) - 1));
}

/* S.T = K Q.T of keys k0 .. k0 + 31 (kg: the head's keys, padded) by the block's two groups of queries (qp, in
 * pairs): tile 2j + group for keys k0 + 16j .. */
static inline void attention_scores(const uint32_t *qp, const uint16_t *kg, int64_t k0, int64_t d) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t i = 0; i < d; i += 32) {
        _tile_loadd(6, qp + i / 2 * 16, 64);
        _tile_loadd(7, qp + (d / 2 + i / 2) * 16, 64);
        _tile_loadd(4, kg + k0 * d + i, d * 2); _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(4, kg + (k0 + 16) * d + i, d * 2); _tile_dpbf16ps(2, 4, 6); _tile_dpbf16ps(3, 4, 7);
    }
}

/* attention_scores' tiles to st: group 0's 32 keys x 16 lanes, then group 1's */
static inline void attention_store_scores(float *st) {
    _tile_stored(0, st, 64); _tile_stored(2, st + 256, 64);
    _tile_stored(1, st + 512, 64); _tile_stored(3, st + 768, 64);
}

/* O.T += V.T P.T in the tiles (0-3: two blocks of 16 columns by the two groups) for the `count` steps' P.T in pp's
 * slots 0 .. count - 1 (keys keys[s] .. keys[s] + ATT_KEYS - 1); vg: the head's V.T, ATT_KEYS keys a block (each
 * block dv x ATT_KEYS, contiguous) */
static inline void attention_values(const uint16_t *vg, int64_t dv, const uint32_t *pp, const int64_t *keys,
                                    int count, float *ot) {
    const int64_t slot = (ATT_KEYS / 2) * 16;  /* words of one group's P.T */
    for (int64_t d0 = 0; d0 < dv; d0 += 32) {
        const int two = d0 + 32 <= dv;
        float *o0 = ot + d0 * 16, *o1 = ot + (dv + d0) * 16;
        _tile_loadd(0, o0, 64); _tile_loadd(1, o1, 64);
        if (two) { _tile_loadd(2, o0 + 256, 64); _tile_loadd(3, o1 + 256, 64); }
        for (int s = 0; s < count; s++) {
            const uint16_t *vb = vg + (keys[s] / ATT_KEYS * dv + d0) * ATT_KEYS;  /* 16 columns x 32 keys */
            _tile_loadd(5, pp + 2 * s * slot, 64);
            _tile_loadd(6, pp + (2 * s + 1) * slot, 64);
            _tile_loadd(4, vb, ATT_KEYS * 2); _tile_dpbf16ps(0, 4, 5); _tile_dpbf16ps(1, 4, 6);
            if (two) {
                _tile_loadd(4, vb + 16 * ATT_KEYS, ATT_KEYS * 2); _tile_dpbf16ps(2, 4, 5); _tile_dpbf16ps(3, 4, 6);
            }
        }
        _tile_stored(0, o0, 64); _tile_stored(1, o1, 64);
        if (two) { _tile_stored(2, o0 + 256, 64); _tile_stored(3, o1 + 256, 64); }
    }
}

/* one head h's 32 queries t0 .. t0 + 31 of batch row b (fewer at the end: n[0], n[1] <= 16 in its two groups of 16, the
 * tiles' lanes), the keys they see ATT_KEYS at a time; kc: this call's K (groups, S64, d), vt: V.T (groups, S64 /
 * ATT_KEYS, dv, ATT_KEYS); the buffers as attention_amx gives each thread.  The tiles: 0-3 sums (S.T of two blocks of
 * 16 keys by the two groups; then V.T P.T of two blocks of 16 columns by them), 4 K or V.T, 5-7 pairs. */
static void attention_block(const uint16_t *q, uint16_t *out, const uint16_t *kc, const uint16_t *vt, int64_t t0,
                            const int64_t n[2], int64_t b, int64_t h, int64_t T, int64_t S, int64_t S64,
                            int64_t heads, int64_t kv_heads, int64_t d, int64_t dv, int64_t window, float scale,
                            uint32_t *qp, float *st, uint32_t *pp, float *ot) {
    const int64_t offset = S - T, g = h / (heads / kv_heads), first = offset + t0, last = first + n[0] + n[1] - 1;
    for (int gq = 0; gq < 2; gq++) {  /* the queries in pairs: word (i, r) = inputs 2i, 2i + 1 of query r */
        const uint32_t *row[16];  /* query r's words (none past n[gq]: zeros) */
        for (int r = 0; r < n[gq]; r++) row[r] = (const uint32_t *)q + ((b * T + t0 + 16 * gq + r) * heads + h) * d / 2;
        for (int64_t i0 = 0; i0 < d / 2; i0 += 16) {  /* 16 words of the 16 queries at a time, transposed */
            __m512i r16[16];
            for (int r = 0; r < 16; r++)
                r16[r] = r < n[gq] ? _mm512_loadu_si512((const void *)(row[r] + i0)) : _mm512_setzero_si512();
            transpose16(r16);
            for (int j = 0; j < 16; j++) _mm512_storeu_si512((void *)(qp + (gq * (d / 2) + i0 + j) * 16), r16[j]);
        }
    }
    const uint16_t *kg = kc + (b * kv_heads + g) * S64 * d, *vg = vt + (b * kv_heads + g) * dv * S64;
    __m512 m[2], l[2];  /* per lane: the exponent's offset (a running maximum, raised only when exceeded by 8) */
    for (int gq = 0; gq < 2; gq++) m[gq] = _mm512_set1_ps(-INFINITY), l[gq] = _mm512_setzero_ps();
    const __m512 c = _mm512_set1_ps(scale * 1.44269504088896341f);  /* scores to the base-2 exponent */
    memset(ot, 0, (size_t)(2 * dv * 16) * sizeof(float));
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  /* (a, b) -> a0 b0 a1 b1 .. */
    const int64_t lo = window > 0 && first - window + 1 > 0 ? first - window + 1 : 0;
    /* P.T goes into O.T ATT_SLOTS steps at a time (one load and store of O.T's tiles for ATT_SLOTS x ATT_KEYS
     * keys): pp's slots hold the steps' P.T until the last is filled; a step whose offsets rise first adds those
     * held (taken at the old offsets) */
    int64_t held[ATT_SLOTS];  /* the first keys of the steps whose P.T waits in slots 0 .. nheld - 1 */
    int nheld = 0;
    for (int64_t k0 = lo / ATT_KEYS * ATT_KEYS; k0 <= last; k0 += ATT_KEYS) {
        attention_scores(qp, kg, k0, d);
        attention_store_scores(st);
        __mmask16 seen[2][ATT_KEYS], raise[2];
        __m512 top[2];
        int all[2];  /* every lane of the group sees every key of the step (its probabilities need no mask) */
        for (int gq = 0; gq < 2; gq++) {  /* each lane's largest score of the keys it sees (st: 32 keys x 16) */
            const float *sg = st + gq * 512;
            const int64_t fg = first + 16 * gq, ng = n[gq];
            const int whole = all[gq] = k0 + ATT_KEYS - 1 <= fg && ng == 16
                                        && (window <= 0 || k0 >= fg + 15 - window + 1);
            top[gq] = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < ATT_KEYS; j++) {
                seen[gq][j] = whole ? (__mmask16)0xffff : seeing(k0 + j, fg, ng, window);
                top[gq] = _mm512_mask_max_ps(top[gq], seen[gq][j], top[gq], _mm512_loadu_ps(sg + j * 16));
            }
            top[gq] = _mm512_mul_ps(top[gq], c);
            /* lanes whose scores pass their offset by more than 8: a new offset (the others keep theirs: their
             * terms stay below 2^8) */
            raise[gq] = _mm512_cmp_ps_mask(top[gq], _mm512_add_ps(m[gq], _mm512_set1_ps(8.0f)), _CMP_GT_OQ);
        }
        if ((raise[0] | raise[1]) && nheld) {  /* the held P.T was taken at the old offsets: into O.T first */
            attention_values(vg, dv, pp, held, nheld, ot);
            nheld = 0;
        }
        const int slot = nheld;
        for (int gq = 0; gq < 2; gq++) {
            if (raise[gq]) {  /* what is summed so far scaled to the new offset: 2^(old - new), 0 where nothing was */
                const __m512 m_new = _mm512_mask_mov_ps(m[gq], raise[gq], top[gq]);
                const __m512 alpha = _mm512_mask_mov_ps(
                    exp2_vec(_mm512_sub_ps(m[gq], m_new)),
                    _mm512_cmp_ps_mask(m[gq], _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm512_setzero_ps());
                m[gq] = m_new;
                l[gq] = _mm512_mul_ps(l[gq], alpha);
                for (int64_t r = 0; r < dv; r++)
                    _mm512_storeu_ps(ot + (gq * dv + r) * 16, _mm512_mul_ps(_mm512_loadu_ps(ot + (gq * dv + r) * 16),
                                                                           alpha));
            }
            const float *sg = st + gq * 512;
            uint32_t *pg = pp + (slot * 2 + gq) * (ATT_KEYS / 2) * 16;
            __m512 sum = _mm512_setzero_ps();
            const int masked = !all[gq];
            for (int j = 0; j < ATT_KEYS; j += 2) {  /* P.T in pairs of keys: word (j / 2, r) = keys j, j + 1 */
                __m512 p0 = exp2_vec(_mm512_fmsub_ps(_mm512_loadu_ps(sg + j * 16), c, m[gq]));
                __m512 p1 = exp2_vec(_mm512_fmsub_ps(_mm512_loadu_ps(sg + (j + 1) * 16), c, m[gq]));
                if (masked) p0 = _mm512_maskz_mov_ps(seen[gq][j], p0), p1 = _mm512_maskz_mov_ps(seen[gq][j + 1], p1);
                sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
                _mm512_storeu_si512((void *)(pg + j / 2 * 16),
                                    _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
            }
            l[gq] = _mm512_add_ps(l[gq], sum);
        }
        held[nheld++] = k0;
        if (nheld == ATT_SLOTS || k0 + ATT_KEYS > last) {  /* the slots full, or the last step: into O.T */
            attention_values(vg, dv, pp, held, nheld, ot);
            nheld = 0;
        }
    }
    for (int gq = 0; gq < 2; gq++) {
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l[gq]);
        for (int64_t c0 = 0; c0 < dv; c0 += 16) {  /* O: 16 x 16 blocks of O.T transposed, divided by l, rounded */
            __m512i r16[16];
            for (int j = 0; j < 16; j++)
                r16[j] = _mm512_castps_si512(v_round_bf16(_mm512_mul_ps(_mm512_loadu_ps(ot + (gq * dv + c0 + j) * 16),
                                                                        inv)));
            transpose16(r16);
            for (int64_t r = 0; r < n[gq]; r++)
                _mm256_storeu_si256((__m256i *)(out + ((b * T + t0 + 16 * gq + r) * heads + h) * dv + c0),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(r16[r], 16)));
        }
    }
}
#endif

/* Causal attention of T queries (positions S - T .. S - 1) over S keys on AMX tiles, bf16:
 * q (B, T, heads, d), k (B, S, kv_heads, d), v (B, S, kv_heads, dv) -> out (B, T, heads, dv); query p sees keys
 * max(0, p - window + 1) .. p (window <= 0: 0 .. p); scores times `scale`.  Needs d % 32 == 0, dv % 16 == 0 and
 * heads % kv_heads == 0 (cpu_gemv.py checks).  Returns 0; -1 without memory;
 * -3 where this build or process has no AMX tiles. */
int attention_amx(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t batch, int64_t T,
                  int64_t S, int64_t heads, int64_t kv_heads, int64_t d, int64_t dv, int64_t window, float scale,
                  int threads) {
#if CPU_GEMV_AMX
    if (!cpu_gemv_amx() || d % 32 || dv % 16 || heads % kv_heads || T > S) return -3;
    const int64_t S64 = (S + ATT_KEYS - 1) / ATT_KEYS * ATT_KEYS, groups = batch * kv_heads;
    uint16_t *kc = malloc((size_t)(groups * S64 * d) * 2), *vt = malloc((size_t)(groups * dv * S64) * 2);
    if (!kc || !vt) { free(kc); free(vt); return -1; }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < groups * (S64 / 16); j++) {  /* K: a head's rows, padded; V.T, 16 keys at a time */
        const int64_t gi = j / (S64 / 16), key0 = j % (S64 / 16) * 16, b = gi / kv_heads, g = gi % kv_heads;
        for (int64_t t = 0; t < 16; t++) {
            uint16_t *row = kc + (gi * S64 + key0 + t) * d;
            if (key0 + t < S) memcpy(row, k + ((b * S + key0 + t) * kv_heads + g) * d, (size_t)d * 2);
            else memset(row, 0, (size_t)d * 2);
        }
        for (int64_t c0 = 0; c0 < dv; c0 += 16) {  /* 16 keys x 16 columns, transposed as 32-bit words */
            __m512i r16[16];
            for (int t = 0; t < 16; t++)
                r16[t] = key0 + t < S ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                             (const __m256i *)(v + ((b * S + key0 + t) * kv_heads + g) * dv + c0)))
                                      : _mm512_setzero_si512();
            transpose16(r16);
            uint16_t *block = vt + ((gi * (S64 / ATT_KEYS) + key0 / ATT_KEYS) * dv + c0) * ATT_KEYS + key0 % ATT_KEYS;
            for (int t = 0; t < 16; t++)
                _mm256_storeu_si256((__m256i *)(block + t * ATT_KEYS), _mm512_cvtepi32_epi16(r16[t]));
        }
    }
    const int64_t blocks = (T + 31) / 32, items = batch * heads * blocks;  /* 32 queries an item */
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *qp = malloc((size_t)(d * 16) * 4), *pp = malloc(ATT_SLOTS * ATT_KEYS * 16 * 4);
        float *st = malloc(2 * ATT_KEYS * 16 * sizeof(float)), *ot = malloc((size_t)(2 * dv * 16) * sizeof(float));
        const int ok = qp && pp && st && ot;
        int configured = 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!amx_item(ok, &configured, &failed)) continue;
            const int64_t blk = blocks - 1 - it % blocks, bh = it / blocks;  /* the longest blocks first */
            const int64_t t0 = blk * 32, left = T - t0;
            const int64_t n[2] = {left < 16 ? left : 16, left < 16 ? 0 : left - 16 < 16 ? left - 16 : 16};
            attention_block(q, out, kc, vt, t0, n, bh / heads, bh % heads, T, S, S64, heads, kv_heads, d, dv, window,
                            scale, qp, st, pp, ot);
        }
        if (configured) _tile_release();
        free(qp), free(pp), free(st), free(ot);
    }
    free(kc), free(vt);
    return failed ? -1 : 0;
#else
    (void)q, (void)k, (void)v, (void)out, (void)batch, (void)T, (void)S, (void)heads, (void)kv_heads, (void)d;
    (void)dv, (void)window, (void)scale, (void)threads;
    return -3;
#endif
}
