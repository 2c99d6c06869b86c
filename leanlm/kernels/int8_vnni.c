/* y = (x @ w^T) * scale with AVX-512 VNNI: int8 weights times int8-quantised activations.
 *
 * The fp32 kernel (int8_matvec.c) converts every weight to fp32 and spends one FMA per 16 products; on this
 * CPU that is compute-bound (Gemma's 262144 x 640 head: 7.8 ms, 21 GB/s). `vpdpbusd` does 64 u8 x s8
 * products per instruction, so the head becomes a pass over memory. As llama.cpp does, each row of x is
 * quantised to int8 with one scale (dx = max|x| / 127), and made unsigned by adding 128 (vpdpbusd wants
 * u8 x s8); the offset comes back out with the weight row's sum:
 *     sum_k w[k] * x[k] ~= dx * (sum_k w[k] * (xq[k] + 128) - 128 * sum_k w[k])
 * Each weight row is loaded once per 64 columns and used for every row of x (up to MT at a time). In a
 * 32-bit lane, vpdpbusd adds 4 adjacent products (columns 4l..4l+3 of the 64): the lanes are summed at the
 * end of the row. Columns beyond K in the last chunk are loaded as zeros (masked loads).
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

/* xq (M, Kp) u8 (xq + 128, zero padded to Kp = K rounded up to 64), dx (M,). IEEE division, not the
 * reciprocal the build flags would allow: bf16 activations often land exactly on .5, so the rounding must
 * not depend on how the compiler rewrote the division (tests compare with round(x / d)). */
__attribute__((optimize("no-reciprocal-math", "no-associative-math")))
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *dx) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
        float d = amax / 127.0f;
        dx[m] = d;
        for (int64_t k = 0; k < Kp; k++) {
            int q = k < K && d > 0 ? (int)lrintf(xr[k] / d) : 0;
            xq[m * Kp + k] = (uint8_t)(q + 128);
        }
    }
}

void int8_matvec_vnni(const float *x, const int8_t *w, const uint16_t *scale, float *y,
                      int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t Kp = (K + 63) / 64 * 64;
    uint8_t *xq = aligned_alloc(64, (size_t)(M * Kp));
    float *dx = malloc(sizeof(float) * (size_t)M);
    quantize_rows(x, M, K, Kp, xq, dx);
    const __m512i ones = _mm512_set1_epi8(1);
    const int64_t full = K / 64, tail = K % 64;
    const __mmask64 tmask = tail ? (((__mmask64)1 << tail) - 1) : 0;
#pragma omp parallel for num_threads(threads) schedule(static, 256)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = M - m0 < MT ? (int)(M - m0) : MT;
            __m512i acc[MT], wsum = _mm512_setzero_si512();
            for (int j = 0; j < MT; j++) acc[j] = _mm512_setzero_si512();
            for (int64_t c = 0; c < full + (tail > 0); c++) {  /* 64 columns at a time, the last one masked */
                __m512i wv = c < full ? _mm512_loadu_si512((const void *)(wr + c * 64))
                                      : _mm512_maskz_loadu_epi8(tmask, (const void *)(wr + c * 64));
                wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
                for (int j = 0; j < mt; j++) {
                    __m512i xv = _mm512_load_si512((const void *)(xq + (m0 + j) * Kp + c * 64));
                    acc[j] = _mm512_dpbusd_epi32(acc[j], xv, wv);
                }
            }
            const int32_t ws = _mm512_reduce_add_epi32(wsum);
            const float s = bf16f(scale[n]);
            for (int j = 0; j < mt; j++) {
                int32_t dot = _mm512_reduce_add_epi32(acc[j]) - 128 * ws;
                y[(m0 + j) * N + n] = (float)dot * dx[m0 + j] * s;
            }
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
