/* CPU kernels of tp-ollama's decode step, loaded by tp_ollama.kernels.native:
  tpo_int4_mm        weight-only int4 matmul on AVX-512 VNNI
  tpo_int8_mm        weight-only int8 matmul on AVX-512 VNNI, weights in 16-row blocks as int4's
  tpo_int8_to_bf16   int8 weights with grouped scales to plain bfloat16 rows, for a prefill's dense matmul
  tpo_rms_norm_bf16  RMSNorm of bfloat16 rows in one call instead of a dozen torch operators
  tpo_read_sum       a sum that reads memory as fast as a core can: the bandwidth roofline's probe
  tpo_argmax         the index of the first maximum of a float32 vector, as torch.argmax (NaN is the
                     largest); torch's own takes ~0.6 ms over a 262k vocabulary, a tenth of a decode step
  tpo_decode         one token through every layer of a Llama-family or Gemma 3 decoder (see below)
  tpo_decode_paged   the same for a batch of sequences on paged KV pools (the server's decode step)
  tpo_decode_logits, tpo_decode_paged_logits
                     the same from token ids to logits: embedding, layers, final norm and LM head
  tpo_shm_all_reduce the shared-memory all-reduce of tp_ollama.parallel.fastcomm_shm, for the decode
                     step of a tensor-parallel shard to call without going through Python

tpo_int4_mm: y (M, N) = x (M, K) @ w.T, float32 in and out.

Weights (the "native" int4 layout of tp_ollama.kernels.quant): rows in blocks of 16; a block holds
K/8 chunks of 64 bytes; in chunk c, byte 4r + i holds row r's code for input 8c + i in its low nibble
and for input 8c + 4 + i in its high nibble. So one 64-byte load, masked and shifted, gives two
registers whose 32-bit lane r holds four consecutive codes of row r: what vpdpbusd multiplies by four
int8 activations and sums into lane r.

Scales and zeros: (K/group, N, 2) bfloat16 (scale, zero), ld_sz (scale, zero) pairs from one group's
row to the next (N, or more for a view of some rows); w = (q - 8) * scale + zero per group.

Activations are quantized per row and per 16 inputs to int8 (scale sx = max|x| / 127 of the 16), so
each 16 inputs' dot product is exact in int32, and a weight group's is
    sum_k w_k x_k ~= scale * sum_s sx_s * sum_{k in s} q_k xq_k + (zero - 8 * scale) * sum_k sx_k xq_k
which is exactly the dot product of the dequantized weights with the quantized activations (as
llama.cpp's Q4 x Q8 products are, whose activation blocks are 32 inputs or 256: half as many
activation scales would double the share of an outlier's group and cost about a third more KL
divergence from the float model).

Rows of blocks are shared among OpenMP threads (the runtime torch itself uses), guided: on a shared
host one core is often slower than the other, and a static split leaves the faster one waiting. Up
to 4 activation rows are done per pass over a block, each reusing the unpacked codes. */

#ifdef TPO_AVX2
#include "avx512_on_avx2.h" /* the AVX2 variant: the same code on 256-bit halves */
#else
#include <immintrin.h>
#define TPO_DPBUSD_SMALL _mm512_dpbusd_epi32
#define TPO_I8_DOT _mm512_dpbusd_epi32
#endif
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <omp.h>
#include <sched.h>
#include <time.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/types.h>

#define BLOCK_ROWS 16
#define CHUNK 8 /* inputs per 64-byte chunk */
/* How far ahead of its reads a thread asks for weight bytes: into L1 1 KiB ahead and into L2 6 KiB
   ahead. The hardware prefetcher alone leaves a core at ~8 GB/s on a stream that does not fit its
   caches; one level of software prefetch got the LM head of gemma3 to ~19 GB/s, two to ~21. */
#define PREFETCH_L1 1024
#define PREFETCH_L2 6144
#define SCALE_PREFETCH_BLOCKS 2 /* the scales of the block this many ahead are asked for up front */

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

static inline __m512i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline float reduce_max(__m512 v) { return _mm512_reduce_max_ps(v); }

#define ACT_GROUP 16 /* activations per int8 scale */

/* xq (M, K) int8; sx (M, K/ACT_GROUP) the activation scales; sumx (M, K/group) per weight group, the
sum of the quantized values times their scales (what the group's activations sum to as the dot
products see them); qsum (M, K/ACT_GROUP), unless NULL, each 16 quantized values' integer sum. */
static void quantize_rows(const float *x, int64_t m_rows, int64_t k, int64_t group, int8_t *xq, float *sx,
                          float *sumx, int32_t *qsum) {
    const int64_t groups = k / group, subs = k / ACT_GROUP;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) sumx[m * groups + g] = 0.0f;
        for (int64_t s = 0; s < subs; s++) {
            const float *p = x + m * k + s * ACT_GROUP;
            const __m512 v = _mm512_loadu_ps(p);
            const float a = reduce_max(_mm512_abs_ps(v));
            const float inv = a > 0.0f ? 127.0f / a : 0.0f;
            sx[m * subs + s] = a / 127.0f;
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(xq + m * k + s * ACT_GROUP), _mm512_cvtsepi32_epi8(q));
            /* The int4 kernel's zero-point term multiplies this sum: it must be the sum of the values the
               dot product sees (the quantized ones), so that the whole is the dot product of the
               dequantized weights with the quantized activations. The float sum of the activations
               instead leaves each rounding error weighted by the unsigned 4-bit code (0..15), not by
               the weight, and doubles the error of the result. */
            int32_t lanes[16];
            _mm512_storeu_si512(lanes, q);
            int32_t total = 0;
            for (int l = 0; l < 16; l++) total += lanes[l];
            sumx[m * groups + s * ACT_GROUP / group] += (float)total * (a / 127.0f);
            if (qsum) qsum[m * subs + s] = total;
        }
    }
}

/* One block of 16 weight rows against MB activation rows. */
#define DEFINE_BLOCK(MB)                                                                                     \
    static inline void block_##MB(const uint8_t *w, const uint32_t *sz, int64_t ld_sz, int64_t k, int64_t group, \
                                  const int8_t *xq, const float *sx, const float *sumx, float *y, int64_t ldy) { \
        const int64_t groups = k / group, subs = k / ACT_GROUP, chunks = ACT_GROUP / CHUNK;                   \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                          \
        const __m512i high_half = _mm512_set1_epi32((int32_t)0xFFFF0000u);                                   \
        __m512 out[MB];                                                                                      \
        for (int m = 0; m < MB; m++) out[m] = _mm512_setzero_ps();                                           \
        for (int64_t g = 0; g < groups; g++)                                                                 \
            _mm_prefetch((const char *)(sz + g * ld_sz + SCALE_PREFETCH_BLOCKS * BLOCK_ROWS), _MM_HINT_T0);  \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            __m512 part[MB];                                                                                 \
            for (int m = 0; m < MB; m++) part[m] = _mm512_setzero_ps();                                      \
            for (int64_t s = g * group / ACT_GROUP; s < (g + 1) * group / ACT_GROUP; s++) {                  \
                __m512i acc_lo[MB], acc_hi[MB];                                                              \
                for (int m = 0; m < MB; m++) acc_lo[m] = acc_hi[m] = _mm512_setzero_si512();                 \
                const uint8_t *ws = w + s * chunks * 64;                                                     \
                for (int64_t c = 0; c < chunks; c++) {                                                       \
                    const __m512i v = _mm512_loadu_si512(ws + c * 64);                                       \
                    _mm_prefetch((const char *)(ws + c * 64 + PREFETCH_L1), _MM_HINT_T0);                   \
                    _mm_prefetch((const char *)(ws + c * 64 + PREFETCH_L2), _MM_HINT_T1);                   \
                    const __m512i lo = _mm512_and_si512(v, low);                                             \
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                       \
                    const int64_t at = s * ACT_GROUP + c * CHUNK;                                            \
                    for (int m = 0; m < MB; m++) {                                                           \
                        acc_lo[m] = TPO_DPBUSD_SMALL(acc_lo[m], lo, broadcast4(xq + m * k + at));            \
                        acc_hi[m] = TPO_DPBUSD_SMALL(acc_hi[m], hi, broadcast4(xq + m * k + at + 4));        \
                    }                                                                                        \
                }                                                                                            \
                for (int m = 0; m < MB; m++)                                                                 \
                    part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc_lo[m], acc_hi[m])),    \
                                              _mm512_set1_ps(sx[m * subs + s]), part[m]);                    \
            }                                                                                                \
            const __m512i pair = _mm512_loadu_si512(sz + g * ld_sz);                                         \
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));                           \
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));                      \
            const __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(-8.0f), scale, zero);                       \
            for (int m = 0; m < MB; m++) {                                                                   \
                out[m] = _mm512_fmadd_ps(part[m], scale, out[m]);                                            \
                out[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sumx[m * groups + g]), out[m]);              \
            }                                                                                                \
        }                                                                                                    \
        for (int m = 0; m < MB; m++) _mm512_storeu_ps(y + m * ldy, out[m]);                                  \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(4)

/* The rows of y (m_rows, n; rows ldy apart) from activations quantized by quantize_rows, 16 weight
rows a task, 4 activation rows a pass. */
static void i4_matmul(const uint8_t *packed, const uint16_t *scale_zero, int64_t ld_sz, int64_t n, int64_t k,
                      int64_t group, int64_t m_rows, const int8_t *xq, const float *sx, const float *sumx, float *y,
                      int64_t ldy, int threads) {
    const uint32_t *sz = (const uint32_t *)scale_zero;
    const int64_t blocks = n / BLOCK_ROWS, block_bytes = BLOCK_ROWS * k / 2, groups = k / group, subs = k / ACT_GROUP;
#pragma omp parallel for schedule(guided, 4) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *w = packed + b * block_bytes;
        const uint32_t *s = sz + b * BLOCK_ROWS;
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4)
            block_4(w, s, ld_sz, k, group, xq + m * k, sx + m * subs, sumx + m * groups, y + m * ldy + b * BLOCK_ROWS, ldy);
        for (; m < m_rows; m++)
            block_1(w, s, ld_sz, k, group, xq + m * k, sx + m * subs, sumx + m * groups, y + m * ldy + b * BLOCK_ROWS, ldy);
    }
}

/* Returns 0, or -1 when the shapes do not fit the layout (nothing is written then). */
int tpo_int4_mm(const float *x, int64_t m_rows, int64_t k, const uint8_t *packed, const uint16_t *scale_zero,
                int64_t ld_sz, int64_t n, int64_t group, float *y, int threads) {
    if (n % BLOCK_ROWS || group % 16 || group <= 0 || k % group || m_rows < 0) return -1;
    int8_t *xq = malloc((size_t)(m_rows * k) + 64);
    float *sx = malloc(sizeof(float) * (size_t)(m_rows * (k / ACT_GROUP)) + 64);
    float *sumx = malloc(sizeof(float) * (size_t)(m_rows * (k / group)) + 64);
    if (!xq || !sx || !sumx) {
        free(xq), free(sx), free(sumx);
        return -2;
    }
    quantize_rows(x, m_rows, k, group, xq, sx, sumx, NULL);
    i4_matmul(packed, scale_zero, ld_sz, n, k, group, m_rows, xq, sx, sumx, y, n, threads);
    free(xq), free(sx), free(sumx);
    return 0;
}

/* tpo_int8_mm: y (M, N) = x (M, K) @ w.T for int8 weights in the blocked int8 layout
(tp_ollama.kernels.quant.Int8Weight with blocked=True; w = q * scale[k / group]):
  q      rows in blocks of 16; a block holds K/4 chunks of 64 bytes; in chunk c, byte 4r + i is row r's
         (signed) code for input 4c + i. One 64-byte load gives a register whose 32-bit lane r holds
         four consecutive codes of row r, as the int4 layout does.
  scale  float32, per block (K/group, 16): one 16-float load gives a group's scale for each row.
The weight's logical shape stays (N, K) and (N, K/group); rows a multiple of 16 apart are whole blocks,
so a view of rows [a, b) (a, b multiples of 16) is a weight in the same layout.

Activations are quantized to int8 per 16 inputs as for int4. vpdpbusd multiplies unsigned by signed
bytes, so the codes are offset to unsigned (+128, an xor of the sign bit) and each 16 inputs'
accumulator starts at -128 times the sum of their quantized activations, which the offset adds: it
then holds the exact int32 dot product. Per row, in the same order whatever the number of rows:
    part = sum over the group's 16-input steps of float(dot) * sx;   out += part * scale[group]
so each row's result is the same bits alone or in a batch. Groups are multiples of 16 inputs. */

#ifndef TPO_AVX2
#define TPO_I8_START(sum) _mm512_set1_epi32(-128 * (sum))
#endif

typedef struct {
    int8_t *xq;
    float *sx, *sumx;
    int32_t *qsum; /* (M, K/16) the sum of each 16 quantized activations */
} act_buffers;

static void act_free(act_buffers *a) {
    free(a->xq), free(a->sx), free(a->sumx), free(a->qsum);
    *a = (act_buffers){0};
}

/* Scratch for quantized activations (int4 and int8 kernels) of up to `rows` rows of up to max_k
inputs; -2 when out of memory (nothing left allocated). */
static int act_alloc(act_buffers *a, size_t rows, int64_t max_k) {
    const size_t f = sizeof(float), k = (size_t)max_k;
    *a = (act_buffers){malloc(rows * k + 64), malloc(f * rows * k + 64), malloc(f * rows * k + 64),
                       malloc(sizeof(int32_t) * rows * (k / ACT_GROUP + 1) + 64)};
    if (a->xq && a->sx && a->sumx && a->qsum) return 0;
    act_free(a);
    return -2;
}

/* One block of 16 weight rows against MB activation rows. */
#define DEFINE_I8_BLOCK(MB)                                                                                  \
    static inline void i8block_##MB(const int8_t *w, const float *ws, int64_t k, int64_t group,             \
                                    const int8_t *xq, const float *sx, const int32_t *qsum, float *y,        \
                                    int64_t ldy) {                                                           \
        const int64_t groups = k / group, subs = k / ACT_GROUP, steps = group / ACT_GROUP;                   \
        const __m512i sign = _mm512_set1_epi8((char)0x80);                                                   \
        __m512 out[MB];                                                                                      \
        for (int m = 0; m < MB; m++) out[m] = _mm512_setzero_ps();                                           \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            __m512 part[MB];                                                                                 \
            for (int m = 0; m < MB; m++) part[m] = _mm512_setzero_ps();                                      \
            for (int64_t s = g * steps; s < (g + 1) * steps; s++) {                                          \
                __m512i acc[MB];                                                                             \
                for (int m = 0; m < MB; m++) acc[m] = TPO_I8_START(qsum[m * subs + s]);                      \
                const int8_t *wc = w + s * ACT_GROUP * BLOCK_ROWS;                                           \
                for (int c = 0; c < ACT_GROUP / 4; c++) {                                                    \
                    const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wc + c * 64), sign);               \
                    _mm_prefetch((const char *)(wc + c * 64 + PREFETCH_L1), _MM_HINT_T0);                   \
                    _mm_prefetch((const char *)(wc + c * 64 + PREFETCH_L2), _MM_HINT_T1);                   \
                    const int64_t at = s * ACT_GROUP + c * 4;                                                \
                    for (int m = 0; m < MB; m++) acc[m] = TPO_I8_DOT(acc[m], v, broadcast4(xq + m * k + at)); \
                }                                                                                            \
                for (int m = 0; m < MB; m++)                                                                 \
                    part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(sx[m * subs + s]), part[m]); \
            }                                                                                                \
            const __m512 scale = _mm512_loadu_ps(ws + g * BLOCK_ROWS);                                       \
            for (int m = 0; m < MB; m++) out[m] = _mm512_fmadd_ps(part[m], scale, out[m]);                   \
        }                                                                                                    \
        for (int m = 0; m < MB; m++) _mm512_storeu_ps(y + m * ldy, out[m]);                                  \
    }

DEFINE_I8_BLOCK(1)
DEFINE_I8_BLOCK(4)

/* The rows of y (m_rows, n; rows ldy apart) from activations quantized by quantize_rows, 16 weight
rows a task, 4 activation rows a pass over a block (which stays in L1 between passes). */
static void i8_matmul(const int8_t *q, const float *scale, int64_t n, int64_t k, int64_t group, int64_t m_rows,
                      const act_buffers *a, float *y, int64_t ldy, int threads) {
    const int64_t blocks = n / BLOCK_ROWS, subs = k / ACT_GROUP;
#pragma omp parallel for schedule(guided, 4) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *w = q + b * BLOCK_ROWS * k;
        const float *ws = scale + b * BLOCK_ROWS * (k / group);
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4)
            i8block_4(w, ws, k, group, a->xq + m * k, a->sx + m * subs, a->qsum + m * subs, y + m * ldy + b * BLOCK_ROWS, ldy);
        for (; m < m_rows; m++)
            i8block_1(w, ws, k, group, a->xq + m * k, a->sx + m * subs, a->qsum + m * subs, y + m * ldy + b * BLOCK_ROWS, ldy);
    }
}

static int i8_fits(int64_t n, int64_t k, int64_t group) {
    return n >= 0 && n % BLOCK_ROWS == 0 && k > 0 && group > 0 && group % ACT_GROUP == 0 && k % group == 0;
}

/* Returns 0, -1 when the shapes do not fit the layout (rows in blocks of 16, groups of a multiple of
16 inputs), -2 when out of memory. */
int tpo_int8_mm(const float *x, int64_t m_rows, int64_t k, const int8_t *q, const float *scale, int64_t group,
                int64_t n, float *y, int threads) {
    if (m_rows < 0 || !i8_fits(n, k, group)) return -1;
    act_buffers a;
    if (act_alloc(&a, (size_t)m_rows, k)) return -2;
    quantize_rows(x, m_rows, k, ACT_GROUP, a.xq, a.sx, a.sumx, a.qsum);
    i8_matmul(q, scale, n, k, group, m_rows, &a, y, n, threads);
    act_free(&a);
    return 0;
}

/* tpo_shm_all_reduce(ctx, x, n): sums n floats at x over the group in place, through the segment of a
tp_ollama.parallel.fastcomm_shm.ShmTransport and by its protocol (see that module): the same rounds
(the round and seen counters live in `state`, shared with the Python transport, so collectives from
either side interleave), the same slots and headers, the same sum in rank order (every rank gets the
same bits). A tpo_decoder's all_reduce hook. Returns 0, or 1 with state[2] the peer and state[3] why:
1 a wait ran past timeout_s, 2 a peer was in another collective, 3 too many bytes or a closed group,
4 the peer's process exited (looked at every liveness_s of a wait's sleeping phase, as the Python side
does: by the process id and PID namespace each rank writes into its control line). */
typedef struct {
    char *seg;                        /* the mapped segment */
    int64_t rank, world, line, header, stride, max_bytes;
    int64_t *state;                   /* round, seen, failed peer, failure, calls, nanoseconds inside */
    double timeout_s, spin_s, yield_s, sleep_s, liveness_s;
} tpo_shm;

enum { SHM_PID_AT = 2, SHM_PID_NS_AT = 3 }; /* int64s of a control line (fastcomm_shm.PID_AT, PID_NS_AT) */

/* Whether rank p's process has exited (gone, or a zombie): fastcomm_shm.process_exited. */
static int shm_peer_exited(const tpo_shm *g, int64_t p) {
    const int64_t *line = (const int64_t *)(g->seg + p * g->line), *own = (const int64_t *)(g->seg + g->rank * g->line);
    const int64_t pid = line[SHM_PID_AT];
    if (pid <= 0 || line[SHM_PID_NS_AT] != own[SHM_PID_NS_AT]) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 1;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    const size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *close = strrchr(buf, ')');
    return close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X');
}

enum { SHM_AR = 1 }; /* fastcomm_base.OPS["all_reduce"] */

static double shm_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static volatile int64_t *shm_arrive(const tpo_shm *g, int64_t p) { return (volatile int64_t *)(g->seg + p * g->line); }

static int64_t *shm_slot(const tpo_shm *g, int64_t parity, int64_t p) {
    return (int64_t *)(g->seg + g->world * g->line + (parity * g->world + p) * g->stride);
}

/* Until every peer's arrive counter is at least r: spin, then yield the core, then sleep briefly. */
static int shm_wait(const tpo_shm *g, int64_t r, double start) {
    double look = g->spin_s + g->yield_s; /* when next to look whether the awaited peer still exists */
    for (;;) {
        int64_t pending = -1;
        for (int64_t p = 0; p < g->world; p++)
            if (p != g->rank && __atomic_load_n(shm_arrive(g, p), __ATOMIC_ACQUIRE) < r) {
                pending = p;
                break;
            }
        if (pending < 0) return 0;
        const double waited = shm_now() - start;
        if (waited < g->spin_s) {
            _mm_pause();
        } else if (waited >= g->timeout_s) {
            g->state[2] = pending, g->state[3] = 1;
            return 1;
        } else if (waited < g->spin_s + g->yield_s) {
            sched_yield();
        } else {
            if (waited >= look) {
                look = waited + g->liveness_s;
                for (int64_t p = 0; p < g->world; p++)
                    if (p != g->rank && __atomic_load_n(shm_arrive(g, p), __ATOMIC_ACQUIRE) < r && shm_peer_exited(g, p)) {
                        g->state[2] = p, g->state[3] = 4;
                        return 1;
                    }
            }
            const struct timespec nap = {0, (long)(g->sleep_s * 1e9)};
            nanosleep(&nap, NULL);
        }
    }
}

int tpo_shm_all_reduce(void *ctx, float *x, int64_t n) {
    const tpo_shm *g = (const tpo_shm *)ctx;
    int64_t *st = g->state;
    const double start = shm_now();
    const int64_t nbytes = n * (int64_t)sizeof(float);
    if (st[0] < 0 || nbytes > g->max_bytes) {
        st[2] = g->rank, st[3] = 3;
        return 1;
    }
    const int64_t r = st[0] + 1, parity = r & 1;
    if (st[1] < r - 1) { /* peers must have read what this rank wrote two rounds ago */
        if (shm_wait(g, r - 1, start)) return 1;
        st[1] = r - 1;
    }
    st[0] = r;
    int64_t *own = shm_slot(g, parity, g->rank);
    memcpy((char *)own + g->header, x, (size_t)nbytes);
    own[0] = r, own[1] = SHM_AR, own[2] = nbytes;
    volatile int64_t *arrive = shm_arrive(g, g->rank);
    arrive[1] = SHM_AR;
    __atomic_store_n(arrive, r, __ATOMIC_RELEASE); /* payload and header before the counter */
    if (shm_wait(g, r, start)) return 1;
    st[1] = r;
    for (int64_t p = 0; p < g->world; p++) {
        const int64_t *h = shm_slot(g, parity, p);
        if (p != g->rank && (h[0] != r || h[1] != SHM_AR || h[2] != nbytes)) {
            st[2] = p, st[3] = 2;
            return 1;
        }
    }
    const float *v0 = (const float *)((char *)shm_slot(g, parity, 0) + g->header);
    const float *v1 = (const float *)((char *)shm_slot(g, parity, 1) + g->header);
    for (int64_t i = 0; i < n; i++) x[i] = v0[i] + v1[i]; /* ((v0 + v1) + v2) + ...: sum_in_rank_order */
    for (int64_t p = 2; p < g->world; p++) {
        const float *vp = (const float *)((char *)shm_slot(g, parity, p) + g->header);
        for (int64_t i = 0; i < n; i++) x[i] += vp[i];
    }
    st[4] += 1;
    st[5] += (int64_t)((shm_now() - start) * 1e9);
    return 0;
}

/* Sums of squares in 16 float32 lanes, then across them: the one order both RMSNorms below use (so
the decode step's norms and the torch modules' agree bit for bit). */
static inline float sum_squares(const float *x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(k, x + j);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static inline float sum_squares_bf16(const uint16_t *x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __m512i raw = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, x + j));
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* RMSNorm of bfloat16 rows, computed in float32: y = x * rsqrt(mean(x^2) + eps), then scaled by a
float32 vector either before the cast back to bfloat16 (Gemma's (1 + w), scale_after_cast 0) or after
it, the product rounded again (Llama's w * bf16(...), scale_after_cast 1), as transformers orders them.
Rows are d values each, ld_x / ld_y elements apart. */
void tpo_rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t d, int64_t ld_x, const float *scale,
                       int scale_after_cast, float eps, uint16_t *y, int64_t ld_y) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * ld_x;
        uint16_t *yr = y + r * ld_y;
        const float inv = 1.0f / sqrtf(sum_squares_bf16(xr, d) / (float)d + eps);
        if (scale_after_cast) {
            for (int64_t j = 0; j < d; j++) yr[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * inv)) * scale[j]);
        } else {
            for (int64_t j = 0; j < d; j++) yr[j] = f32_to_bf16(bf16_to_f32(xr[j]) * inv * scale[j]);
        }
    }
}

/* tpo_decode: one token of one sequence through every layer of a decoder whose linear layers are all
int4 in the native layout, in one call: norms, the q/k/v matmul, per-head q/k norms, rotary, the KV
cache write, attention over the cache, the output projection, the MLP and the residuals. What costs a
thousand torch operators and ctypes calls a step (several microseconds each) costs one call.

It follows the torch modules of tp_ollama.models operation by operation. With bfloat16 activations
(bf16 = 1) every value is rounded to bfloat16 where torch's bfloat16 operator would round it, so
both paths agree to within summation order; with float32 nothing is rounded.

Layer order (Llama family; Gemma 3 adds the norms in brackets and scales its norms by (1 + w)):
    h = attention(input_norm(x))          [h = post_attn_norm(h)]    x = x + h
    h = mlp(pre_ffn_norm(x))              [h = post_ffn_norm(h)]     x = x + h
Caches hold keys and values in the activation dtype. tpo_decode: one sequence's (n_kv, capacity,
head_dim) cache; position p goes to slot p % capacity and the first min(p + 1, capacity) slots are
attended over: the cache was filled from position 0 on, and a sliding layer's ring holds exactly its
window. tpo_decode_paged: the layer's pool of (blocks, n_kv, block_size, head_dim); position p of a
sequence is in block table[p / block_size] at offset p % block_size, and a sliding layer attends
over the positions within its window. */

typedef struct {
    int int8;                    /* 0: int4 in the native layout; 1: int8 in the blocked layout (tpo_int8_mm) */
    const uint8_t *packed;       /* int4: (n, k/2) native layout; int8: q (n, k) blocked */
    const void *scale_zero;      /* int4: (k/group, ld_sz, 2) bfloat16; int8: blocked float32 scales (ld_sz unused) */
    int64_t ld_sz, n, k, group;  /* n = 0: no layer (the part of a fused one) */
    const float *bias;           /* (n), already in the activation dtype's values; NULL: none */
} tpo_linear;

typedef struct {
    /* q, k, v write consecutive outputs (q alone when fused: its n covers all three); so do gate, up */
    tpo_linear q, k, v, o, gate, up, down;
    const float *input_norm, *pre_ffn_norm;
    const float *post_attn_norm, *post_ffn_norm;  /* Gemma 3; NULL for the Llama family */
    const float *q_norm, *k_norm;                 /* per-head norms (Gemma 3, Qwen3); NULL: none */
    const float *inv_freq;                        /* (head_dim / 2) rotary inverse frequencies */
    /* tpo_decode: one sequence's (n_kv, capacity, head_dim) cache; tpo_decode_paged: the layer's pool
       of (blocks, n_kv, block_size, head_dim) */
    void *k_cache, *v_cache;
    int64_t *cache_pos;                           /* tpo_decode: (capacity) the position each slot holds */
    int64_t capacity;                             /* tpo_decode */
    int64_t window;                               /* tpo_decode_paged: sliding window, 0: none */
} tpo_layer;

typedef struct {
    int64_t n_layers, hidden, n_q, n_kv, head_dim, intermediate;
    float eps, attn_scale;
    int bf16;              /* activations (and caches) in bfloat16, else float32 */
    int norm_unit_offset;  /* norms scale by a (1 + w) vector before rounding (Gemma), else by w after */
    int gelu;              /* MLP activation: GELU (tanh) for Gemma, else SiLU */
    const tpo_layer *layers;
    /* tpo_decode_logits, tpo_decode_paged_logits: token ids in, logits out */
    int embed_kind;          /* EMBED_QUANT (embed as a tpo_linear), EMBED_F32 or EMBED_BF16 rows at embed.packed */
    tpo_linear embed;        /* (vocab, hidden); n = 0: none (the logits functions refuse) */
    float embed_scale;       /* Gemma's sqrt(hidden) in the activation dtype's value; 0: none */
    const float *final_norm; /* (hidden) */
    tpo_linear head;         /* (vocab, hidden) LM head; n = 0: none */
    /* A tensor-parallel shard: o and down hold this rank's columns, their outputs are partial sums.
       all_reduce(ctx, x, n) sums the n floats at x over the group in place and returns 0, else the
       step stops and returns -3. NULL: a whole model. */
    int (*all_reduce)(void *ctx, float *x, int64_t n);
    void *reduce_ctx;
    /* Query heads kv_first[j] .. kv_first[j+1]-1 read KV head j ((n_kv + 1) offsets, from 0 to n_q):
       a shard of an uneven split, whose heads need not come in equal groups. NULL: n_q / n_kv each. */
    const int64_t *kv_first;
} tpo_decoder;

enum { EMBED_QUANT = 0, EMBED_F32 = 1, EMBED_BF16 = 2 };

/* The structs' layout as this compiler made it, for the ctypes binding (tp_ollama/models/native_decode.py)
to check its own against before it passes a pointer: for tpo_linear, tpo_layer and tpo_decoder in turn,
the size, then every field's offset in declaration order. Writes up to n values, returns how many
there are. */
#define TPO_LAYOUT_LINEAR(X) X(tpo_linear, int8) X(tpo_linear, packed) X(tpo_linear, scale_zero) \
    X(tpo_linear, ld_sz) X(tpo_linear, n) X(tpo_linear, k) X(tpo_linear, group) X(tpo_linear, bias)
#define TPO_LAYOUT_LAYER(X) X(tpo_layer, q) X(tpo_layer, k) X(tpo_layer, v) X(tpo_layer, o) X(tpo_layer, gate) \
    X(tpo_layer, up) X(tpo_layer, down) X(tpo_layer, input_norm) X(tpo_layer, pre_ffn_norm) \
    X(tpo_layer, post_attn_norm) X(tpo_layer, post_ffn_norm) X(tpo_layer, q_norm) X(tpo_layer, k_norm) \
    X(tpo_layer, inv_freq) X(tpo_layer, k_cache) X(tpo_layer, v_cache) X(tpo_layer, cache_pos) \
    X(tpo_layer, capacity) X(tpo_layer, window)
#define TPO_LAYOUT_DECODER(X) X(tpo_decoder, n_layers) X(tpo_decoder, hidden) X(tpo_decoder, n_q) \
    X(tpo_decoder, n_kv) X(tpo_decoder, head_dim) X(tpo_decoder, intermediate) X(tpo_decoder, eps) \
    X(tpo_decoder, attn_scale) X(tpo_decoder, bf16) X(tpo_decoder, norm_unit_offset) X(tpo_decoder, gelu) \
    X(tpo_decoder, layers) X(tpo_decoder, embed_kind) X(tpo_decoder, embed) X(tpo_decoder, embed_scale) \
    X(tpo_decoder, final_norm) X(tpo_decoder, head) X(tpo_decoder, all_reduce) X(tpo_decoder, reduce_ctx) \
    X(tpo_decoder, kv_first)
#define TPO_OFFSET(type, field) (int64_t) offsetof(type, field),
int64_t tpo_struct_layout(int64_t *out, int64_t n) {
    const int64_t v[] = {(int64_t)sizeof(tpo_linear), TPO_LAYOUT_LINEAR(TPO_OFFSET)(int64_t)sizeof(tpo_layer),
                         TPO_LAYOUT_LAYER(TPO_OFFSET)(int64_t)sizeof(tpo_decoder), TPO_LAYOUT_DECODER(TPO_OFFSET)};
    const int64_t count = (int64_t)(sizeof(v) / sizeof(v[0]));
    for (int64_t i = 0; i < n && i < count; i++) out[i] = v[i];
    return count;
}

static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

/* round_bf16 of 16 lanes: round to nearest even, NaNs kept quiet, as f32_to_bf16. */
static inline __m512 round_bf16_16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v), high = _mm512_set1_epi32((int32_t)0xFFFF0000u);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), high);
    const __m512i quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)), high);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
    return _mm512_castsi512_ps(r);
}

static inline void round_all(float *v, int64_t n, int bf16) {
    if (!bf16) return;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, round_bf16_16(_mm512_loadu_ps(v + i)));
    for (; i < n; i++) v[i] = round_bf16(v[i]);
}

/* tpo_int8_to_bf16: out (n, k) bfloat16, plain rows, = q * scale[k / group] from the blocked int8
layout (see tpo_int8_mm), rounded to nearest even (what Int8Weight.dequantize(bfloat16) gives), for the
dense matmul of a prompt's prefill: one pass over the weight instead of torch's several. Returns 0, or
-1 for shapes the layout does not take. */
int tpo_int8_to_bf16(const int8_t *q, const float *scale, int64_t group, int64_t n, int64_t k, uint16_t *out,
                     int threads) {
    if (!i8_fits(n, k, group)) return -1;
    const int64_t groups = k / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        const int8_t *block = q + (r / BLOCK_ROWS) * BLOCK_ROWS * k;
        const float *ws = scale + (r / BLOCK_ROWS) * BLOCK_ROWS * groups;
        const int64_t lane = r % BLOCK_ROWS;
        uint16_t *o = out + r * k;
        for (int64_t j = 0; j < k; j += 16) {
            int32_t four[4];
            for (int c = 0; c < 4; c++) memcpy(&four[c], block + (j / 4 + c) * 64 + 4 * lane, 4);
            const __m128i codes = _mm_loadu_si128((const __m128i *)four);
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)),
                                           _mm512_set1_ps(ws[(j / group) * BLOCK_ROWS + lane]));
            const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_bf16_16(v)), 16);
            _mm256_storeu_si256((__m256i *)(o + j), _mm512_cvtepi32_epi16(bits));
        }
    }
    return 0;
}

/* e^x for 16 lanes (Cephes' expf: range reduction by ln 2, a degree-6 polynomial), within ~2 ulp. */
static inline __m512 exp_16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* y = norm(x) over n values (y may be x): as RMSNorm.forward in tp_ollama.models.common. */
static void norm(const float *x, int64_t n, const float *scale, const tpo_decoder *m, float *y) {
    int64_t i;
    const float inv = 1.0f / sqrtf(sum_squares(x, n) / (float)n + m->eps); /* as tpo_rms_norm_bf16 sums */
    const int after = m->bf16 && !m->norm_unit_offset;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
        if (after) v = round_bf16_16(v);
        _mm512_storeu_ps(y + i, _mm512_mul_ps(v, _mm512_loadu_ps(scale + i)));
    }
    for (; i < n; i++) y[i] = (after ? round_bf16(x[i] * inv) : x[i] * inv) * scale[i];
    round_all(y, n, m->bf16);
}

/* y (rows, n; rows ldy apart) = x (rows, k) @ w.T, rounded as quant_matmul's output and bias add are. */
static void linear(const tpo_linear *w, const float *x, int64_t rows, float *y, int64_t ldy, act_buffers *a,
                   const tpo_decoder *m, int threads) {
    if (w->n == 0) return;
    if (w->int8) {
        quantize_rows(x, rows, w->k, ACT_GROUP, a->xq, a->sx, a->sumx, a->qsum);
        i8_matmul((const int8_t *)w->packed, (const float *)w->scale_zero, w->n, w->k, w->group, rows, a, y, ldy, threads);
    } else {
        quantize_rows(x, rows, w->k, w->group, a->xq, a->sx, a->sumx, NULL);
        i4_matmul(w->packed, w->scale_zero, w->ld_sz, w->n, w->k, w->group, rows, a->xq, a->sx, a->sumx, y, ldy, threads);
    }
    for (int64_t r = 0; r < rows; r++) {
        float *yr = y + r * ldy;
        round_all(yr, w->n, m->bf16);
        if (w->bias)
            for (int64_t i = 0; i < w->n; i++) yr[i] = m->bf16 ? round_bf16(yr[i] + w->bias[i]) : yr[i] + w->bias[i];
    }
}

/* x * cos + rotate_half(x) * sin over one head, as apply_rotary computes it: the first half of x
becomes x1 cos - x2 sin, the second x2 cos + x1 sin (d / 2 a multiple of 16). */
static void rotary(float *x, int64_t d, const float *cos_, const float *sin_, int bf16) {
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; j += 16) {
        const __m512 x1 = _mm512_loadu_ps(x + j), x2 = _mm512_loadu_ps(x + half + j);
        const __m512 c = _mm512_loadu_ps(cos_ + j), sn = _mm512_loadu_ps(sin_ + j);
        __m512 a1 = _mm512_mul_ps(x1, c), b1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), sn);
        __m512 a2 = _mm512_mul_ps(x2, c), b2 = _mm512_mul_ps(x1, sn);
        if (bf16) {
            a1 = round_bf16_16(a1), b1 = round_bf16_16(b1), a2 = round_bf16_16(a2), b2 = round_bf16_16(b2);
            _mm512_storeu_ps(x + j, round_bf16_16(_mm512_add_ps(a1, b1)));
            _mm512_storeu_ps(x + half + j, round_bf16_16(_mm512_add_ps(a2, b2)));
        } else {
            _mm512_storeu_ps(x + j, _mm512_add_ps(a1, b1));
            _mm512_storeu_ps(x + half + j, _mm512_add_ps(a2, b2));
        }
    }
}

/* x += h, rounded as a bfloat16 add rounds. */
static void add_into(float *x, const float *h, int64_t n, int bf16) {
    for (int64_t i = 0; i < n; i++) x[i] += h[i];
    round_all(x, n, bf16);
}

static inline void cache_put(void *cache, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)cache)[i] = f32_to_bf16(v);
    else ((float *)cache)[i] = v;
}

/* 16 cached values of row `s` from column j, as float32. */
static inline __m512 cache_16(const void *cache, int64_t at, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)cache + at);
    const __m512i raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + at)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
}

#define MAX_THREADS 64

/* The cache is read ahead as the weights are: a core's hardware prefetcher alone streams it at ~5 GB/s.
Keys are read a row after another, KV_AHEAD rows ahead; values a tile of KV_TILE rows at a time, 32
columns of every row of the tile per pass (so all but the first pass read the tile from L1), the next
tile's rows asked for during this one. */
#define KV_AHEAD 4
#define KV_TILE 16

static inline void prefetch_row_part(const void *cache, int64_t at, int bf16) {
    _mm_prefetch((const char *)cache + at * (bf16 ? 2 : 4), _MM_HINT_T0);
}

/* Scores of G query heads (q: G rows of d) against the keys of slots [s0, s1): each key read and
converted once for all G. scores: row g at g * len; pmax: each head's running maximum. */
#define DEFINE_QK(G)                                                                                         \
    static void qk_##G(const float *q, const void *kc, int64_t s0, int64_t s1, int64_t d, int bf16, float scale, \
                       float *scores, int64_t len, float *pmax) {                                            \
        for (int64_t s = s0; s < s1; s++) {                                                                  \
            __m512 acc[G];                                                                                   \
            for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();                                        \
            for (int64_t j = 0; j < d; j += 16) {                                                            \
                if (!bf16 || j % 32 == 0) prefetch_row_part(kc, (s + KV_AHEAD) * d + j, bf16);               \
                const __m512 kk = cache_16(kc, s * d + j, bf16);                                             \
                for (int g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + j), kk, acc[g]); \
            }                                                                                                \
            for (int g = 0; g < G; g++) {                                                                    \
                const float sc = _mm512_reduce_add_ps(acc[g]) * scale;                                       \
                scores[g * len + s] = sc;                                                                    \
                if (sc > pmax[g]) pmax[g] = sc;                                                              \
            }                                                                                                \
        }                                                                                                    \
    }

/* out (G rows of d) += the values of slots [s0, s1) weighted by w (row g at g * len), a tile of rows
at a time: 32 columns per pass, their sums in registers across the tile. d is a multiple of 32. */
#define DEFINE_PV(G)                                                                                         \
    static void pv_##G(const float *w, int64_t len, const void *vc, int64_t s0, int64_t s1, int64_t d, int bf16, \
                       float *out) {                                                                         \
        for (int64_t t0 = s0; t0 < s1; t0 += KV_TILE) {                                                      \
            const int64_t t1 = t0 + KV_TILE < s1 ? t0 + KV_TILE : s1;                                        \
            for (int64_t j = 0; j < d; j += 32) {                                                            \
                __m512 lo[G], hi[G];                                                                         \
                for (int g = 0; g < G; g++) lo[g] = hi[g] = _mm512_setzero_ps();                             \
                for (int64_t s = t0; s < t1; s++) {                                                          \
                    prefetch_row_part(vc, (s + KV_TILE) * d + j, bf16);                                      \
                    if (!bf16) prefetch_row_part(vc, (s + KV_TILE) * d + j + 16, bf16);                      \
                    const __m512 v0 = cache_16(vc, s * d + j, bf16), v1 = cache_16(vc, s * d + j + 16, bf16); \
                    for (int g = 0; g < G; g++) {                                                            \
                        const __m512 wg = _mm512_set1_ps(w[g * len + s]);                                    \
                        lo[g] = _mm512_fmadd_ps(wg, v0, lo[g]);                                              \
                        hi[g] = _mm512_fmadd_ps(wg, v1, hi[g]);                                              \
                    }                                                                                        \
                }                                                                                            \
                for (int g = 0; g < G; g++) {                                                                \
                    float *o = out + g * d + j;                                                              \
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), lo[g]));                           \
                    _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), hi[g]));                 \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_QK(1)
DEFINE_QK(2)
DEFINE_QK(4)
DEFINE_QK(8)
DEFINE_PV(1)
DEFINE_PV(2)
DEFINE_PV(4)
DEFINE_PV(8)

/* How many of `left` query heads to take together: 8, 4, 2 or 1. */
static inline int64_t heads_at_once(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* A run of cached rows that lie one after another in memory: `count` of them from element offset `at`
(KV head 0; head h is kv_stride elements further), holding score indices start..start+count-1. */
typedef struct {
    int64_t at, start, count;
} kv_run;

/* The rows of `run` (as its own indices s0..s1-1) whose score indices fall in [a, b); 0 if none. */
static inline int run_share(const kv_run *run, int64_t a, int64_t b, int64_t *s0, int64_t *s1) {
    *s0 = (a > run->start ? a : run->start) - run->start;
    *s1 = (b < run->start + run->count ? b : run->start + run->count) - run->start;
    return *s1 > *s0;
}

/* Every query head over `len` cached rows of its KV head (the runs), into out (n_q, head_dim).

The rows are split among the threads; each reads its share of K and V once for all the query heads
of a KV head (GQA models share one among several). Scores and softmax are float32 with one maximum
per head; with bfloat16 the exponentials are rounded before they weight the values, as torch's CPU
flash attention does, and the output is rounded once. scores: (n_q, len); part: (threads, n_q,
head_dim); psum, pmax: (threads, n_q). head_dim is a multiple of 32. */
static void attention(const float *q, const void *k_base, const void *v_base, int64_t kv_stride, const kv_run *runs,
                      int64_t n_runs, int64_t len, const tpo_decoder *m, float *scores, float *part, float *psum,
                      float *pmax, float *out, int threads) {
    const int64_t nq = m->n_q, nkv = m->n_kv, d = m->head_dim, group = nq / nkv;
    const int64_t *first = m->kv_first;
    const int bf16 = m->bf16;
    const size_t elt = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t a = len * t / nt, b = len * (t + 1) / nt;
        float *tmax = pmax + t * nq, *mine = part + (int64_t)t * nq * d;
        for (int64_t h = 0; h < nq; h++) tmax[h] = -INFINITY;
        for (int64_t r = 0; r < n_runs; r++) {
            int64_t s0, s1;
            if (!run_share(&runs[r], a, b, &s0, &s1)) continue;
            for (int64_t kv = 0; kv < nkv; kv++) {
                const void *kc = (const char *)k_base + (size_t)(runs[r].at + kv * kv_stride) * elt;
                const int64_t h_end = first ? first[kv + 1] : (kv + 1) * group;
                for (int64_t h = first ? first[kv] : kv * group; h < h_end;) {
                    const int64_t g = heads_at_once(h_end - h);
                    float *sc = scores + h * len + runs[r].start;
                    if (g == 8) qk_8(q + h * d, kc, s0, s1, d, bf16, m->attn_scale, sc, len, tmax + h);
                    else if (g == 4) qk_4(q + h * d, kc, s0, s1, d, bf16, m->attn_scale, sc, len, tmax + h);
                    else if (g == 2) qk_2(q + h * d, kc, s0, s1, d, bf16, m->attn_scale, sc, len, tmax + h);
                    else qk_1(q + h * d, kc, s0, s1, d, bf16, m->attn_scale, sc, len, tmax + h);
                    h += g;
                }
            }
        }
#pragma omp barrier
        /* weights e^(score - max) over this thread's rows, and their sum */
        for (int64_t h = 0; h < nq; h++) {
            float top = -INFINITY;
            for (int i = 0; i < nt; i++)
                if (pmax[i * nq + h] > top) top = pmax[i * nq + h];
            float sum = 0.0f;
            float *sc = scores + h * len;
            for (int64_t s = a; s < b; s += 16) {
                const __mmask16 k = b - s >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (b - s)) - 1u);
                const __m512 e = exp_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + s), _mm512_set1_ps(top)));
                sum += _mm512_mask_reduce_add_ps(k, e);
                _mm512_mask_storeu_ps(sc + s, k, bf16 ? round_bf16_16(e) : e);
            }
            psum[t * nq + h] = sum;
        }
        /* this thread's share of the weighted values */
        memset(mine, 0, sizeof(float) * (size_t)(nq * d));
        for (int64_t r = 0; r < n_runs; r++) {
            int64_t s0, s1;
            if (!run_share(&runs[r], a, b, &s0, &s1)) continue;
            for (int64_t kv = 0; kv < nkv; kv++) {
                const void *vc = (const char *)v_base + (size_t)(runs[r].at + kv * kv_stride) * elt;
                const int64_t h_end = first ? first[kv + 1] : (kv + 1) * group;
                for (int64_t h = first ? first[kv] : kv * group; h < h_end;) {
                    const int64_t g = heads_at_once(h_end - h);
                    const float *w = scores + h * len + runs[r].start;
                    if (g == 8) pv_8(w, len, vc, s0, s1, d, bf16, mine + h * d);
                    else if (g == 4) pv_4(w, len, vc, s0, s1, d, bf16, mine + h * d);
                    else if (g == 2) pv_2(w, len, vc, s0, s1, d, bf16, mine + h * d);
                    else pv_1(w, len, vc, s0, s1, d, bf16, mine + h * d);
                    h += g;
                }
            }
        }
#pragma omp barrier
        /* sum the shares: heads split among the threads */
        for (int64_t h = t; h < nq; h += nt) {
            float total = 0.0f;
            for (int i = 0; i < nt; i++) total += psum[i * nq + h];
            for (int64_t j = 0; j < d; j++) {
                float acc = 0.0f;
                for (int i = 0; i < nt; i++) acc += part[((int64_t)i * nq + h) * d + j];
                out[h * d + j] = acc / total;
            }
            round_all(out + h * d, d, bf16);
        }
    }
}

/* gate (n) = act(gate) * up, rounded as torch rounds each. Both activations are v / (1 + e^-z):
SiLU with z = v, GELU (tanh) with z = 2u, since 0.5 (1 + tanh u) = 1 / (1 + e^-2u), u = sqrt(2/pi) (v + 0.044715 v^3). */
static void gated_act(float *gate, const float *up, int64_t n, int gelu, int bf16) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(gate + i);
        __m512 z = v;
        if (gelu) {
            const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
            z = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, v));
        }
        __m512 act = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
        if (bf16) act = round_bf16_16(_mm512_mul_ps(round_bf16_16(act), _mm512_loadu_ps(up + i)));
        else act = _mm512_mul_ps(act, _mm512_loadu_ps(up + i));
        _mm512_storeu_ps(gate + i, act);
    }
    for (; i < n; i++) {
        const float v = gate[i];
        const float z = gelu ? 2.0f * 0.7978845608028654f * (v + 0.044715f * v * v * v) : v;
        const float act = v / (1.0f + expf(-z));
        gate[i] = bf16 ? round_bf16(round_bf16(act) * up[i]) : act * up[i];
    }
}

/* x (hidden) = the embedding of `token`, as the embedding modules dequantize it (float32 operations in
the same order, then rounded to the activation dtype), times Gemma's scale in that dtype. */
static void embed_row(const tpo_decoder *m, int64_t token, float *x) {
    const tpo_linear *e = &m->embed;
    const int64_t k = e->k;
    if (m->embed_kind == EMBED_F32) {
        memcpy(x, (const float *)e->packed + token * k, sizeof(float) * (size_t)k);
    } else if (m->embed_kind == EMBED_BF16) {
        for (int64_t j = 0; j < k; j++) x[j] = bf16_to_f32(((const uint16_t *)e->packed)[token * k + j]);
    } else if (e->int8) { /* q * scale of its group; the row is lane token % 16 of its block (see tpo_int8_mm) */
        const int8_t *block = (const int8_t *)e->packed + (token / BLOCK_ROWS) * BLOCK_ROWS * k;
        const float *scale = (const float *)e->scale_zero + (token / BLOCK_ROWS) * BLOCK_ROWS * (k / e->group);
        const int64_t lane = token % BLOCK_ROWS;
        for (int64_t j = 0; j < k; j++)
            x[j] = (float)block[(j / 4) * 64 + 4 * lane + j % 4] * scale[(j / e->group) * BLOCK_ROWS + lane];
    } else { /* (q - 8) * scale + zero; the row is lane token % 16 of its block (see tpo_int4_mm) */
        const uint8_t *block = e->packed + (token / BLOCK_ROWS) * BLOCK_ROWS * (k / 2);
        const int64_t lane = token % BLOCK_ROWS;
        for (int64_t j = 0; j < k; j++) {
            const uint8_t byte = block[(j / CHUNK) * 64 + 4 * lane + j % 4];
            const int code = (j % CHUNK) < 4 ? byte & 0x0F : byte >> 4;
            const uint16_t *sz = (const uint16_t *)e->scale_zero + 2 * ((j / e->group) * e->ld_sz + token);
            const float scaled = ((float)code - 8.0f) * bf16_to_f32(sz[0]);
            x[j] = scaled + bf16_to_f32(sz[1]);
        }
    }
    if (m->bf16) round_all(x, k, 1);
    if (m->embed_scale != 0.0f)
        for (int64_t j = 0; j < k; j++) x[j] = m->bf16 ? round_bf16(x[j] * m->embed_scale) : x[j] * m->embed_scale;
}

/* Where one row's cache is: a sequence's own contiguous cache (tpo_decode) or block tables into the
layers' pools (tpo_decode_paged). */
typedef struct {
    const int64_t *tables;  /* (rows, max_blocks) block ids; NULL: contiguous */
    int64_t max_blocks, block_size;
} kv_pages;

/* The runs of cached rows position `pos` attends over in layer L, and where its own key goes
(element offset, KV head 0). Returns the number of runs; *len the rows, *stride KV heads apart. */
static int64_t cache_runs(const tpo_layer *L, const tpo_decoder *m, const kv_pages *pages, int64_t row, int64_t pos,
                          kv_run *runs, int64_t *len, int64_t *stride, int64_t *write_at) {
    const int64_t d = m->head_dim;
    if (!pages->tables) {
        /* slot p % capacity; the first min(pos + 1, capacity) slots are every position still seen */
        *len = pos + 1 < L->capacity ? pos + 1 : L->capacity;
        *stride = L->capacity * d;
        *write_at = (pos % L->capacity) * d;
        runs[0] = (kv_run){0, 0, *len};
        return 1;
    }
    const int64_t bs = pages->block_size, *table = pages->tables + row * pages->max_blocks;
    const int64_t first = L->window > 0 && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    *len = pos - first + 1;
    *stride = bs * d;
    *write_at = (table[pos / bs] * m->n_kv * bs + pos % bs) * d;
    int64_t n = 0;
    for (int64_t p = first; p <= pos; n++) {
        const int64_t off = p % bs, count = (bs - off < pos + 1 - p) ? bs - off : pos + 1 - p;
        runs[n] = (kv_run){(table[p / bs] * m->n_kv * bs + off) * d, p - first, count};
        p += count;
    }
    return n;
}

/* x (rows, hidden) holds the embedded tokens on entry and the last layer's outputs on return (before
the final norm); row r is at position pos[r]. Returns 0, -1 on shapes the step does not take, -2
when out of memory. */
/* A shard's partial sums (o, down) summed over the group, then rounded to the activation dtype as the
torch modules' all-reduce of a bfloat16 tensor leaves them. */
static int reduce_rows(const tpo_decoder *m, float *h, int64_t n) {
    if (m->all_reduce(m->reduce_ctx, h, n)) return -1;
    round_all(h, n, m->bf16);
    return 0;
}

static int decode(const tpo_decoder *m, float *x, int64_t rows, const int64_t *pos, const kv_pages *pages,
                  const int64_t *tokens, float *logits, int threads) {
    const int64_t d = m->hidden, hd = m->head_dim, nq = m->n_q, nkv = m->n_kv, inter = m->intermediate;
    if (hd > 1024 || hd % 32 || (!m->kv_first && nq % nkv) || rows < 1) return -1;
    if (m->kv_first && (m->kv_first[0] != 0 || m->kv_first[nkv] != nq)) return -1;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t max_k = d > nq * hd ? d : nq * hd, max_len = 0;
    if (inter > max_k) max_k = inter;
    for (int64_t r = 0; r < rows; r++) {
        if (pos[r] < 0) return -1;
        for (int64_t l = 0; l < m->n_layers; l++) {
            const int64_t cap = pages->tables ? pos[r] + 1 : m->layers[l].capacity;
            if (cap > max_len) max_len = cap;
        }
    }
    const int64_t max_runs = pages->tables ? max_len / pages->block_size + 2 : 1;
    const int64_t qkv_n = (nq + 2 * nkv) * hd;
    const size_t f = sizeof(float), R = (size_t)rows;
    float *h = malloc(f * R * (size_t)d), *qkv = malloc(f * R * (size_t)qkv_n);
    float *attn = malloc(f * R * (size_t)(nq * hd)), *gu = malloc(f * R * (size_t)(2 * inter));
    float *act = malloc(f * R * (size_t)inter), *scores = malloc(f * (size_t)(nq * max_len));
    float *trig = malloc(f * R * (size_t)(m->n_layers * hd));
    int64_t *table_of = malloc(sizeof(int64_t) * (size_t)(2 * m->n_layers)), n_tables = 0;
    kv_run *runs = malloc(sizeof(kv_run) * (size_t)max_runs);
    act_buffers a;
    const int no_acts = act_alloc(&a, R, max_k);
    float *part = malloc(f * (size_t)(threads * nq * hd)), *psum = malloc(f * (size_t)(threads * nq));
    float *pmax = malloc(f * (size_t)(threads * nq));
    int rc = 0;
    if (!h || !qkv || !attn || !gu || !act || !scores || !trig || !table_of || !runs || no_acts || !part || !psum || !pmax) {
        rc = -2;
        goto done;
    }
    if (tokens)
        for (int64_t r = 0; r < rows; r++) embed_row(m, tokens[r], x + r * d);
    /* cos and sin of each row's position, rounded as the rotary module rounds them: once per distinct
       table of frequencies (Gemma's sliding and global layers have two), not in every layer.
       table_of[l]: layer l's table; first[t]: the first layer with table t. */
    int64_t *first = table_of + m->n_layers;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const float *freq = m->layers[l].inv_freq;
        int64_t t = 0;
        while (t < n_tables && memcmp(m->layers[first[t]].inv_freq, freq, sizeof(float) * (size_t)(hd / 2))) t++;
        if (t == n_tables) first[n_tables++] = l;
        table_of[l] = t;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < n_tables; t++) {
            float *cos_ = trig + (r * n_tables + t) * hd, *sin_ = cos_ + hd / 2;
            for (int64_t i = 0; i < hd / 2; i++) {
                const float fr = (float)pos[r] * m->layers[first[t]].inv_freq[i];
                cos_[i] = m->bf16 ? round_bf16(cosf(fr)) : cosf(fr);
                sin_[i] = m->bf16 ? round_bf16(sinf(fr)) : sinf(fr);
            }
        }
    for (int64_t l = 0; l < m->n_layers; l++) {
        const tpo_layer *L = &m->layers[l];
        /* attention */
        for (int64_t r = 0; r < rows; r++) norm(x + r * d, d, L->input_norm, m, h + r * d);
        linear(&L->q, h, rows, qkv, qkv_n, &a, m, threads);
        linear(&L->k, h, rows, qkv + L->q.n, qkv_n, &a, m, threads);
        linear(&L->v, h, rows, qkv + L->q.n + L->k.n, qkv_n, &a, m, threads);
        for (int64_t r = 0; r < rows; r++) {
            float *q = qkv + r * qkv_n, *k = q + nq * hd, *v = q + (nq + nkv) * hd;
            if (L->q_norm)
                for (int64_t i = 0; i < nq; i++) norm(q + i * hd, hd, L->q_norm, m, q + i * hd);
            if (L->k_norm)
                for (int64_t i = 0; i < nkv; i++) norm(k + i * hd, hd, L->k_norm, m, k + i * hd);
            const float *cos_ = trig + (r * n_tables + table_of[l]) * hd, *sin_ = cos_ + hd / 2;
            for (int64_t i = 0; i < nq; i++) rotary(q + i * hd, hd, cos_, sin_, m->bf16);
            for (int64_t i = 0; i < nkv; i++) rotary(k + i * hd, hd, cos_, sin_, m->bf16);
            int64_t len, stride, write_at;
            const int64_t n_runs = cache_runs(L, m, pages, r, pos[r], runs, &len, &stride, &write_at);
            for (int64_t i = 0; i < nkv; i++)
                for (int64_t j = 0; j < hd; j++) {
                    cache_put(L->k_cache, write_at + i * stride + j, k[i * hd + j], m->bf16);
                    cache_put(L->v_cache, write_at + i * stride + j, v[i * hd + j], m->bf16);
                }
            if (!pages->tables) L->cache_pos[pos[r] % L->capacity] = pos[r];
            attention(q, L->k_cache, L->v_cache, stride, runs, n_runs, len, m, scores, part, psum, pmax,
                      attn + r * nq * hd, threads);
        }
        linear(&L->o, attn, rows, h, d, &a, m, threads);
        if (m->all_reduce && reduce_rows(m, h, rows * d)) {
            rc = -3;
            goto done;
        }
        for (int64_t r = 0; r < rows; r++)
            if (L->post_attn_norm) norm(h + r * d, d, L->post_attn_norm, m, h + r * d);
        add_into(x, h, rows * d, m->bf16);
        /* MLP */
        for (int64_t r = 0; r < rows; r++) norm(x + r * d, d, L->pre_ffn_norm, m, h + r * d);
        linear(&L->gate, h, rows, gu, 2 * inter, &a, m, threads);
        linear(&L->up, h, rows, gu + L->gate.n, 2 * inter, &a, m, threads);
        for (int64_t r = 0; r < rows; r++) {
            gated_act(gu + r * 2 * inter, gu + r * 2 * inter + inter, inter, m->gelu, m->bf16);
            memcpy(act + r * inter, gu + r * 2 * inter, f * (size_t)inter);
        }
        linear(&L->down, act, rows, h, d, &a, m, threads);
        if (m->all_reduce && reduce_rows(m, h, rows * d)) {
            rc = -3;
            goto done;
        }
        for (int64_t r = 0; r < rows; r++)
            if (L->post_ffn_norm) norm(h + r * d, d, L->post_ffn_norm, m, h + r * d);
        add_into(x, h, rows * d, m->bf16);
    }
    if (logits) { /* the final norm and the LM head, rounded as the head's matmul output is */
        for (int64_t r = 0; r < rows; r++) norm(x + r * d, d, m->final_norm, m, h + r * d);
        linear(&m->head, h, rows, logits, m->head.n, &a, m, threads);
    }
done:
    free(h), free(qkv), free(attn), free(gu), free(act), free(scores), free(trig), free(table_of), free(runs);
    act_free(&a); /* zeroed when its allocation failed */
    free(part), free(psum), free(pmax);
    return rc;
}

/* One token of one sequence, x (hidden), on its own contiguous caches (the layers' k_cache, v_cache,
cache_pos, capacity): the cache holds positions 0..pos-1 as generation fills it. */
int tpo_decode(const tpo_decoder *m, float *x, int64_t pos, int threads) {
    const kv_pages contiguous = {NULL, 0, 0};
    return decode(m, x, 1, &pos, &contiguous, NULL, NULL, threads);
}

/* One token of each of `rows` sequences, x (rows, hidden), at positions pos (rows), on the layers'
KV pools (k_cache, v_cache: (blocks, n_kv, block_size, head_dim); window) through block tables
(rows, max_blocks): the server's batch. Each sequence's slot for pos is reserved in its table. */
int tpo_decode_paged(const tpo_decoder *m, float *x, int64_t rows, const int64_t *pos, const int64_t *tables,
                     int64_t max_blocks, int64_t block_size, int threads) {
    if (block_size < 1 || max_blocks < 1) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (pos[r] < 0 || pos[r] / block_size >= max_blocks) return -1;
    const kv_pages pages = {tables, max_blocks, block_size};
    return decode(m, x, rows, pos, &pages, NULL, NULL, threads);
}

/* Whether the decoder has what the logits functions need, and every token id is in its vocabulary. */
static int takes_tokens(const tpo_decoder *m, const int64_t *tokens, int64_t rows) {
    if (m->embed.n < 1 || m->head.n < 1 || !m->final_norm || m->embed.k != m->hidden || m->head.k != m->hidden) return 0;
    for (int64_t r = 0; r < rows; r++)
        if (tokens[r] < 0 || tokens[r] >= m->embed.n) return 0;
    return 1;
}

/* As tpo_decode from the token id to the logits (vocab) float32 (rounded to the activation dtype): the
embedding, every layer, the final norm and the LM head in one call. A few torch operators a step are
few, but run after the weights have streamed through the caches they cost ~0.1 ms each. */
int tpo_decode_logits(const tpo_decoder *m, int64_t token, int64_t pos, float *logits, int threads) {
    if (!takes_tokens(m, &token, 1)) return -1;
    float *x = malloc(sizeof(float) * (size_t)m->hidden);
    if (!x) return -2;
    const kv_pages contiguous = {NULL, 0, 0};
    const int rc = decode(m, x, 1, &pos, &contiguous, &token, logits, threads);
    free(x);
    return rc;
}

/* As tpo_decode_paged from token ids (rows) to logits (rows, vocab), as tpo_decode_logits. */
int tpo_decode_paged_logits(const tpo_decoder *m, const int64_t *tokens, int64_t rows, const int64_t *pos,
                            const int64_t *tables, int64_t max_blocks, int64_t block_size, float *logits, int threads) {
    if (block_size < 1 || max_blocks < 1 || rows < 1 || !takes_tokens(m, tokens, rows)) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (pos[r] < 0 || pos[r] / block_size >= max_blocks) return -1;
    float *x = malloc(sizeof(float) * (size_t)(rows * m->hidden));
    if (!x) return -2;
    const kv_pages pages = {tables, max_blocks, block_size};
    const int rc = decode(m, x, rows, pos, &pages, tokens, logits, threads);
    free(x);
    return rc;
}

/* The sum of n float32 values (n a multiple of 64, p 64-byte aligned), four independent accumulators
per thread: a read of memory limited by the memory, not by a dependency chain, to measure the read
bandwidth that decode is held against. */
float tpo_read_sum(const float *p, int64_t n, int threads) {
    float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 64) {
            s0 = _mm512_add_ps(s0, _mm512_load_ps(p + i));
            s1 = _mm512_add_ps(s1, _mm512_load_ps(p + i + 16));
            s2 = _mm512_add_ps(s2, _mm512_load_ps(p + i + 32));
            s3 = _mm512_add_ps(s3, _mm512_load_ps(p + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    return total;
}

/* The index of the first largest of n float32 values, NaN counting as larger than any number (the
first NaN wins), as torch.argmax: each lane keeps its first maximum, lanes are merged by value, then
lowest index. n >= 1. */
int64_t tpo_argmax(const float *x, int64_t n) {
    int64_t i = 0, best = 0;
    if (n >= 16) {
        __m512 top = _mm512_loadu_ps(x);
        __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        __m512i idx = at;
        if (_mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q)) i = 0;
        else
            for (i = 16; i + 16 <= n && i + 16 <= INT32_MAX; i += 16) {
                const __m512 v = _mm512_loadu_ps(x + i);
                idx = _mm512_add_epi32(idx, step);
                if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;
                const __mmask16 more = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
                top = _mm512_mask_mov_ps(top, more, v);
                at = _mm512_mask_mov_epi32(at, more, idx);
            }
        float lane_top[16];
        int32_t lane_at[16];
        _mm512_storeu_ps(lane_top, top);
        _mm512_storeu_si512(lane_at, at);
        best = lane_at[0];
        for (int l = 1; l < 16; l++)
            if (lane_top[l] > x[best] || (lane_top[l] == x[best] && lane_at[l] < best)) best = lane_at[l];
    }
    /* the tail, or the chunk holding the first NaN, one at a time */
    for (; i < n; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}
