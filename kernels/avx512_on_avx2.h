/* AVX-512 on AVX2: the intrinsics cpu_kernels.c uses, for CPUs without AVX-512 (most laptops and many
servers). SIMDe (libsimde-dev, header-only) emulates nearly all of them with pairs of 256-bit
operations; the few it lacks are defined here the same way, or element by element for the masked
loads and stores of the tails. Built only for the AVX2 variant (TPO_AVX2). */
#ifndef TPO_AVX512_ON_AVX2_H
#define TPO_AVX512_ON_AVX2_H
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <stdint.h>

static inline simde__m512 tpo_cvtepi32_ps(simde__m512i a) {
    simde__m512i_private a_ = simde__m512i_to_private(a);
    simde__m512_private r;
    for (int i = 0; i < 2; i++) r.m256[i] = simde_mm256_cvtepi32_ps(a_.m256i[i]);
    return simde__m512_from_private(r);
}
static inline simde__m512i tpo_cvtps_epi32(simde__m512 a) {
    simde__m512_private a_ = simde__m512_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 2; i++) r.m256i[i] = simde_mm256_cvtps_epi32(a_.m256[i]);
    return simde__m512i_from_private(r);
}
static inline simde__m512i tpo_cvtepu16_epi32(simde__m256i a) {
    simde__m256i_private a_ = simde__m256i_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 2; i++) r.m256i[i] = simde_mm256_cvtepu16_epi32(a_.m128i[i]);
    return simde__m512i_from_private(r);
}
static inline simde__m512i tpo_cvtepi8_epi32(simde__m128i a) {
    simde__m512i_private r;
    r.m256i[0] = simde_mm256_cvtepi8_epi32(a);
    r.m256i[1] = simde_mm256_cvtepi8_epi32(simde_mm_srli_si128(a, 8));
    return simde__m512i_from_private(r);
}
static inline simde__m256i tpo_cvtepi32_epi16(simde__m512i a) { /* lanes hold 0..65535 (bfloat16 bits) */
    simde__m512i_private a_ = simde__m512i_to_private(a);
    const simde__m256i packed = simde_mm256_packus_epi32(a_.m256i[0], a_.m256i[1]); /* 128-bit lanes interleave */
    return simde_mm256_permute4x64_epi64(packed, 0xD8);
}
static inline float tpo_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float tpo_reduce_add_ps(simde__m512 a) {
    simde__m512_private a_ = simde__m512_to_private(a);
    return tpo_hsum8(_mm256_add_ps(a_.m256[0], a_.m256[1]));
}
static inline float tpo_reduce_max_ps(simde__m512 a) {
    simde__m512_private a_ = simde__m512_to_private(a);
    __m256 m8 = _mm256_max_ps(a_.m256[0], a_.m256[1]);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline float tpo_mask_reduce_add_ps(simde__mmask16 k, simde__m512 a) {
    simde__m512_private a_ = simde__m512_to_private(a);
    float s = 0.0f;
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) s += a_.f32[i];
    return s;
}
static inline simde__m512 tpo_maskz_loadu_ps(simde__mmask16 k, const void *p) {
    if (k == (simde__mmask16)0xFFFF) return simde_mm512_loadu_ps(p);
    simde__m512_private r;
    for (int i = 0; i < 16; i++) r.f32[i] = (k >> i & 1) ? ((const float *)p)[i] : 0.0f;
    return simde__m512_from_private(r);
}
static inline void tpo_mask_storeu_ps(void *p, simde__mmask16 k, simde__m512 a) {
    if (k == (simde__mmask16)0xFFFF) {
        simde_mm512_storeu_ps(p, a);
        return;
    }
    simde__m512_private a_ = simde__m512_to_private(a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) ((float *)p)[i] = a_.f32[i];
}
static inline simde__m512i tpo_maskz_loadu_epi8(simde__mmask64 k, const void *p) {
    if (k == ~(simde__mmask64)0) return simde_mm512_loadu_si512(p);
    simde__m512i_private r;
    for (int i = 0; i < 64; i++) r.i8[i] = (k >> i & 1) ? ((const int8_t *)p)[i] : 0;
    return simde__m512i_from_private(r);
}
static inline simde__m256i tpo_maskz_loadu_epi16(simde__mmask16 k, const void *p) {
    if (k == (simde__mmask16)0xFFFF) return simde_mm256_loadu_si256(p);
    simde__m256i_private r;
    for (int i = 0; i < 16; i++) r.i16[i] = (k >> i & 1) ? ((const int16_t *)p)[i] : 0;
    return simde__m256i_from_private(r);
}
/* vpdpbusd for the int4 kernel: acc + the sum of each lane's four unsigned x signed byte products. For
int4 codes (u <= 15) vpmaddubsw cannot saturate, so one pair of multiply-adds gives it exactly. */
static inline simde__m512i tpo_dpbusd_small(simde__m512i acc, simde__m512i u, simde__m512i s) {
    simde__m512i_private a_ = simde__m512i_to_private(acc), u_ = simde__m512i_to_private(u),
                         s_ = simde__m512i_to_private(s), r;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 2; i++) {
        const __m256i pairs = _mm256_maddubs_epi16(u_.m256i[i], s_.m256i[i]);
        r.m256i[i] = _mm256_add_epi32(a_.m256i[i], _mm256_madd_epi16(pairs, ones));
    }
    return simde__m512i_from_private(r);
}
/* The int8 kernel's dot: vpdpbusd(acc, w ^ 0x80, x) with acc starting at -128 * sum(x) adds sum(w * x)
for signed weights w. Here that sum directly, by vpmaddubsw of |w| and x with w's sign, which cannot
saturate (|w| <= 128, |x| <= 127); the accumulator starts at 0. */
static inline simde__m512i tpo_i8_dot(simde__m512i acc, simde__m512i wu, simde__m512i x) {
    simde__m512i_private a_ = simde__m512i_to_private(acc), w_ = simde__m512i_to_private(wu),
                         x_ = simde__m512i_to_private(x), r;
    const __m256i sign = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 2; i++) {
        const __m256i w = _mm256_xor_si256(w_.m256i[i], sign);
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x_.m256i[i], w));
        r.m256i[i] = _mm256_add_epi32(a_.m256i[i], _mm256_madd_epi16(pairs, ones));
    }
    return simde__m512i_from_private(r);
}
#define TPO_I8_START(sum) ((void)(sum), _mm512_setzero_si512())
#define TPO_DPBUSD_SMALL tpo_dpbusd_small
#define TPO_I8_DOT tpo_i8_dot
#define _mm512_cvtepi32_ps tpo_cvtepi32_ps
#define _mm512_cvtps_epi32 tpo_cvtps_epi32
#define _mm512_cvtepu16_epi32 tpo_cvtepu16_epi32
#define _mm512_cvtepi8_epi32 tpo_cvtepi8_epi32
#define _mm512_cvtepi32_epi16 tpo_cvtepi32_epi16
#define _mm512_reduce_add_ps tpo_reduce_add_ps
#define _mm512_reduce_max_ps tpo_reduce_max_ps
#define _mm512_mask_reduce_add_ps tpo_mask_reduce_add_ps
#define _mm512_maskz_loadu_ps tpo_maskz_loadu_ps
#define _mm512_mask_storeu_ps tpo_mask_storeu_ps
#define _mm512_maskz_loadu_epi8 tpo_maskz_loadu_epi8
#define _mm256_maskz_loadu_epi16 tpo_maskz_loadu_epi16
#endif
