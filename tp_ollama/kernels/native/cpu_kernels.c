/* CPU kernels of tp-ollama's decode step, loaded by tp_ollama.kernels.native:
  tpo_int4_mm        weight-only int4 matmul on AVX-512 VNNI
  tpo_rms_norm_bf16  RMSNorm of bfloat16 rows in one call instead of a dozen torch operators

tpo_int4_mm: y (M, N) = x (M, K) @ w.T, float32 in and out.

Weights (the "native" int4 layout of tp_ollama.kernels.quant): rows in blocks of 16; a block holds
K/8 chunks of 64 bytes; in chunk c, byte 4r + i holds row r's code for input 8c + i in its low nibble
and for input 8c + 4 + i in its high nibble. So one 64-byte load, masked and shifted, gives two
registers whose 32-bit lane r holds four consecutive codes of row r: what vpdpbusd multiplies by four
int8 activations and sums into lane r.

Scales and zeros: (K/group, N, 2) bfloat16 (scale, zero), ld_sz (scale, zero) pairs from one group's
row to the next (N, or more for a view of some rows); w = (q - 8) * scale + zero per group.

Activations are quantized per row and per group to int8 (scale max|x| / 127), so a group's dot
product is exact in int32:
    sum_k w_k x_k ~= scale * sx * sum_k q_k xq_k + (zero - 8 * scale) * sum_k x_k
where the second sum is the float sum of the group's activations.

Rows of blocks are shared among OpenMP threads (the runtime torch itself uses); up to 4 activation
rows are done per pass over a block, each reusing the unpacked codes. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define BLOCK_ROWS 16
#define CHUNK 8 /* inputs per 64-byte chunk */

static inline __m512i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline float reduce_max(__m512 v) { return _mm512_reduce_max_ps(v); }

/* xq (M, K) int8, sx and sumx (M, K/group): per-group scales and float sums of each row. */
static void quantize_rows(const float *x, int64_t m_rows, int64_t k, int64_t group, int8_t *xq, float *sx,
                          float *sumx) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const float *p = x + m * k + g * group;
            __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < group; j += 16) {
                __m512 v = _mm512_loadu_ps(p + j);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
                sum = _mm512_add_ps(sum, v);
            }
            const float a = reduce_max(amax);
            const float inv = a > 0.0f ? 127.0f / a : 0.0f;
            sx[m * groups + g] = a / 127.0f;
            sumx[m * groups + g] = _mm512_reduce_add_ps(sum);
            const __m512 scale = _mm512_set1_ps(inv);
            for (int64_t j = 0; j < group; j += 16) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + j), scale));
                _mm_storeu_si128((__m128i *)(xq + m * k + g * group + j), _mm512_cvtsepi32_epi8(q));
            }
        }
    }
}

/* One block of 16 weight rows against MB activation rows. */
#define DEFINE_BLOCK(MB)                                                                                     \
    static inline void block_##MB(const uint8_t *w, const uint32_t *sz, int64_t ld_sz, int64_t k, int64_t group, \
                                  const int8_t *xq, const float *sx, const float *sumx, float *y, int64_t ldy) { \
        const int64_t groups = k / group, chunks = group / CHUNK;                                             \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                          \
        const __m512i high_half = _mm512_set1_epi32((int32_t)0xFFFF0000u);                                   \
        __m512 out[MB];                                                                                      \
        for (int m = 0; m < MB; m++) out[m] = _mm512_setzero_ps();                                           \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            __m512i acc_lo[MB], acc_hi[MB];                                                                  \
            for (int m = 0; m < MB; m++) acc_lo[m] = acc_hi[m] = _mm512_setzero_si512();                     \
            const uint8_t *wg = w + g * chunks * 64;                                                         \
            for (int64_t c = 0; c < chunks; c++) {                                                           \
                const __m512i v = _mm512_loadu_si512(wg + c * 64);                                           \
                const __m512i lo = _mm512_and_si512(v, low);                                                 \
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                           \
                const int64_t at = g * group + c * CHUNK;                                                    \
                for (int m = 0; m < MB; m++) {                                                               \
                    acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], lo, broadcast4(xq + m * k + at));             \
                    acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], hi, broadcast4(xq + m * k + at + 4));         \
                }                                                                                            \
            }                                                                                                \
            const __m512i pair = _mm512_loadu_si512(sz + g * ld_sz);                                         \
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));                           \
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));                      \
            const __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(-8.0f), scale, zero);                       \
            for (int m = 0; m < MB; m++) {                                                                   \
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(acc_lo[m], acc_hi[m]));               \
                out[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(sx[m * groups + g])), out[m]); \
                out[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sumx[m * groups + g]), out[m]);              \
            }                                                                                                \
        }                                                                                                    \
        for (int m = 0; m < MB; m++) _mm512_storeu_ps(y + m * ldy, out[m]);                                  \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(4)

/* Returns 0, or -1 when the shapes do not fit the layout (nothing is written then). */
int tpo_int4_mm(const float *x, int64_t m_rows, int64_t k, const uint8_t *packed, const uint16_t *scale_zero,
                int64_t ld_sz, int64_t n, int64_t group, float *y, int threads) {
    if (n % BLOCK_ROWS || group % 16 || group <= 0 || k % group || m_rows < 0) return -1;
    const int64_t groups = k / group;
    int8_t *xq = malloc((size_t)(m_rows * k) + 64);
    float *sx = malloc(sizeof(float) * (size_t)(m_rows * groups) + 64);
    float *sumx = malloc(sizeof(float) * (size_t)(m_rows * groups) + 64);
    if (!xq || !sx || !sumx) {
        free(xq), free(sx), free(sumx);
        return -2;
    }
    quantize_rows(x, m_rows, k, group, xq, sx, sumx);
    const uint32_t *sz = (const uint32_t *)scale_zero;
    const int64_t blocks = n / BLOCK_ROWS, block_bytes = BLOCK_ROWS * k / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *w = packed + b * block_bytes;
        const uint32_t *s = sz + b * BLOCK_ROWS;
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4)
            block_4(w, s, ld_sz, k, group, xq + m * k, sx + m * groups, sumx + m * groups, y + m * n + b * BLOCK_ROWS, n);
        for (; m < m_rows; m++)
            block_1(w, s, ld_sz, k, group, xq + m * k, sx + m * groups, sumx + m * groups, y + m * n + b * BLOCK_ROWS, n);
    }
    free(xq), free(sx), free(sumx);
    return 0;
}

/* RMSNorm of bfloat16 rows, computed in float32: y = x * rsqrt(mean(x^2) + eps), then scaled by a
float32 vector either before the cast back to bfloat16 (Gemma's (1 + w), scale_after_cast 0) or after
it, the product rounded again (Llama's w * bf16(...), scale_after_cast 1), as transformers orders them.
Rows are d values each, ld_x / ld_y elements apart. */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch converts */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu)) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

void tpo_rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t d, int64_t ld_x, const float *scale,
                       int scale_after_cast, float eps, uint16_t *y, int64_t ld_y) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * ld_x;
        uint16_t *yr = y + r * ld_y;
        float sum = 0.0f;
        for (int64_t j = 0; j < d; j++) {
            const float v = bf16_to_f32(xr[j]);
            sum += v * v;
        }
        const float inv = 1.0f / sqrtf(sum / (float)d + eps);
        if (scale_after_cast) {
            for (int64_t j = 0; j < d; j++) yr[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * inv)) * scale[j]);
        } else {
            for (int64_t j = 0; j < d; j++) yr[j] = f32_to_bf16(bf16_to_f32(xr[j]) * inv * scale[j]);
        }
    }
}
