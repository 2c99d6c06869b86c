/* y = (x @ w^T) * scale for int8 weights: the output head of a decode step.
 *
 * x (M, K) fp32, w (N, K) int8 row-major, scale (N,) bf16 bits, y (M, N) fp32; M is small (the decode batch).
 * Every weight row is read once for all M rows of x, so the cost is one pass over w: a memory-bound
 * kernel. Rows are split over threads; the inner loop over K is plain C that gcc vectorises with
 * -O3 -march=native (int8 -> fp32 conversion and fused multiply-add, 16 lanes with AVX-512).
 * MT rows of x are done together so each converted weight vector is used MT times.
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;  /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define MT 4

static void rows_block(const float *x, const int8_t *w, const uint16_t *scale, float *y,
                       int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            int64_t mt = M - m0 < MT ? M - m0 : MT;
            float acc[MT] = {0};
            if (mt == MT) {
                const float *x0 = x + (m0 + 0) * K, *x1 = x + (m0 + 1) * K;
                const float *x2 = x + (m0 + 2) * K, *x3 = x + (m0 + 3) * K;
                float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int64_t k = 0; k < K; k++) {
                    float wk = (float)wr[k];
                    a0 += wk * x0[k];
                    a1 += wk * x1[k];
                    a2 += wk * x2[k];
                    a3 += wk * x3[k];
                }
                acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
            } else {
                for (int64_t j = 0; j < mt; j++) {
                    const float *xj = x + (m0 + j) * K;
                    float a = 0;
#pragma omp simd reduction(+ : a)
                    for (int64_t k = 0; k < K; k++) a += (float)wr[k] * xj[k];
                    acc[j] = a;
                }
            }
            for (int64_t j = 0; j < mt; j++) y[(m0 + j) * N + n] = acc[j] * bf16_to_float(scale[n]);
        }
    }
}

void int8_matvec(const float *x, const int8_t *w, const uint16_t *scale, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t block = 256;  /* rows per work item: 160 KiB of weights at K = 640 */
    int64_t nblocks = (N + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
        rows_block(x, w, scale, y, M, N, K, n0, n1);
    }
}
