/* y = (x @ w^T) * scale with AVX-512 VNNI: int8 weights times int16-quantised activations.
 *
 * The fp32 kernel (int8_matvec.c) converts every weight to fp32 and spends one FMA per 16 products; on this
 * CPU (Zen 4: 512-bit FMAs at half rate) that is compute-bound for more than one row of x. `vpdpwssd` does
 * 32 int16 products per instruction into 32-bit lanes. Each row of x is quantised to int16 with one scale
 * (dx = max|x| / qmax, qmax <= 32767): a relative error of ~1e-5, where int8 activations (vpdpbusd, as
 * llama.cpp does) cost +0.4% perplexity and 3% of greedy tokens on SmolLM2 (bench/NOTES.md).
 * Each weight row is loaded once per 64 columns, widened to int16, and used for every row of x (MT at a
 * time); a lane adds adjacent pairs of products, and the lanes are summed at the end of the row. Columns
 * beyond K in the last chunk are loaded as zeros (masked loads).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

int int8_vnni_available(void) { return 1; }

#define MT 4

static inline float bf16f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* xq (M, Kp) int16 (zero padded to Kp = K rounded up to 64), dx (M,). IEEE division, not the reciprocal
 * the build flags would allow, so the rounding does not depend on how the compiler rewrote it (the tests
 * compare with round(x / d)). qmax keeps every 32-bit lane below 2^31: a lane sums K / 16 products. */
__attribute__((optimize("no-reciprocal-math", "no-associative-math")))
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t Kp, int16_t *xq, float *dx) {
    const int64_t lane = (K + 15) / 16 * 127, cap = 2147483647 / (lane > 0 ? lane : 1);
    const float qmax = (float)(cap < 32767 ? cap : 32767);
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
        float d = amax / qmax;
        dx[m] = d;
        for (int64_t k = 0; k < Kp; k++) xq[m * Kp + k] = (int16_t)(k < K && d > 0 ? lrintf(xr[k] / d) : 0);
    }
}

void int8_matvec_vnni(const float *x, const int8_t *w, const uint16_t *scale, float *y,
                      int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 63) / 64 * 64;
    int16_t *xq = aligned_alloc(64, (size_t)(M * Kp) * sizeof(int16_t));
    float *dx = malloc(sizeof(float) * (size_t)M);
    quantize_rows(x, M, K, Kp, xq, dx);
    const int64_t full = K / 64, tail = K % 64;
    const __mmask64 tmask = tail ? (((__mmask64)1 << tail) - 1) : 0;
#pragma omp parallel for num_threads(threads) schedule(static, 256)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? (int)(M - m0) : MT;
            __m512i acc[MT];
            for (int j = 0; j < MT; j++) acc[j] = _mm512_setzero_si512();
            for (int64_t c = 0; c < full + (tail > 0); c++) {  /* 64 columns at a time, the last one masked */
                __m512i wv = c < full ? _mm512_loadu_si512((const void *)(wr + c * 64))
                                      : _mm512_maskz_loadu_epi8(tmask, (const void *)(wr + c * 64));
                __m512i w0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(wv));  /* columns 0-31 as int16 */
                __m512i w1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(wv, 1));  /* columns 32-63 */
                for (int j = 0; j < mt; j++) {
                    const int16_t *xr = xq + (m0 + j) * Kp + c * 64;
                    acc[j] = _mm512_dpwssd_epi32(acc[j], _mm512_load_si512((const void *)xr), w0);
                    acc[j] = _mm512_dpwssd_epi32(acc[j], _mm512_load_si512((const void *)(xr + 32)), w1);
                }
            }
            const float s = bf16f(scale[n]);
            for (int j = 0; j < mt; j++)  /* lanes summed as floats: their int32 total could overflow */
                y[(m0 + j) * N + n] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[j])) * dx[m0 + j] * s;
        }
    }
    free(xq);
    free(dx);
}
#else
int int8_vnni_available(void) { return 0; }

void int8_matvec_vnni(const float *x, const int8_t *w, const uint16_t *scale, float *y,
                      int64_t M, int64_t N, int64_t K, int threads) {
    (void)x, (void)w, (void)scale, (void)y, (void)M, (void)N, (void)K, (void)threads;
}
#endif
