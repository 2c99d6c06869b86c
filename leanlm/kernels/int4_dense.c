/* Dense bf16 weights from PyTorch's packed int4 CPU layout, for prefill.
 *
 * `aten._weight_int4pack_mm_for_cpu` is fast for a few rows of activations but reaches only ~150 GFLOP/s
 * on a 512-token prompt chunk, where a bf16 matmul reaches ~400. So prefill unpacks each weight into a
 * temporary dense bf16 matrix (one layer's matrix at a time) and multiplies that.
 *
 * Packed layout (learned by packing probe matrices; see quant/int4.py): rows in blocks of 64; a block is
 * Kt x 32 bytes, and byte j of column k holds row j in its low nibble and row j + 32 in its high nibble:
 *     byte index of (n, k) = (n / 64) * Kt * 32 + k * 32 + n % 32,   high nibble iff n % 64 >= 32
 * Worked example, Kt = 64: (0, 1) -> byte 32 low; (32, 0) -> byte 0 high; (64, 0) -> byte 2048 low.
 * Value: (q - 8) * scale + zero with scale, zero = sz[k / 32][n][0..1] (bf16).
 *
 * Planes (quant/repack.py): formats wider than 4 bits are P int4 planes over an input expanded plane by
 * plane, group by group (g = 32, or 16 for formats with 16-weight sub-blocks): packed column
 * (j * P + p) * g + e multiplies input column j * g + e by mults[p]. The dense weight sums the planes:
 *     W[n, j * g + e] = sum_p mults[p] * Wp[n, (j * P + p) * g + e]
 * e.g. g = 16, P = 2: packed columns 0-15 and 16-31 both land on input columns 0-15 (lo and hi plane).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even (no NaNs occur here) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* packed (N/64 * Kt * 32) bytes, sz (Kt/32, N, 2) bf16, mults (P,) fp32 or NULL when P == 1,
 * out (N, Kt / P) bf16. N is a multiple of 64 and Kt a multiple of 32 and of g * P. */
void int4_dense_bf16(const uint8_t *packed, const uint16_t *sz, const float *mults, uint16_t *out,
                     int64_t N, int64_t Kt, int64_t P, int64_t g, int threads) {
    const int64_t K = Kt / P, nblocks = N / 64;
#pragma omp parallel num_threads(threads)
    {
        float *acc = malloc(sizeof(float) * 64 * K);  /* (K, 64): one row block, transposed */
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < nblocks; nb++) {
            memset(acc, 0, sizeof(float) * 64 * K);
            const uint8_t *blk = packed + nb * Kt * 32;
            for (int64_t k = 0; k < Kt; k++) {
                const int64_t p = (k / g) % P, kd = (k / (g * P)) * g + k % g;
                const float m = mults ? mults[p] : 1.0f;
                const uint16_t *s = sz + ((k / 32) * N + nb * 64) * 2;
                const uint8_t *col = blk + k * 32;
                float *a = acc + kd * 64;
#pragma omp simd
                for (int64_t j = 0; j < 32; j++) {
                    float lo = (float)(col[j] & 15) - 8.0f, hi = (float)(col[j] >> 4) - 8.0f;
                    a[j] += m * (lo * bf16_to_float(s[2 * j]) + bf16_to_float(s[2 * j + 1]));
                    a[j + 32] += m * (hi * bf16_to_float(s[2 * (j + 32)]) + bf16_to_float(s[2 * (j + 32) + 1]));
                }
            }
            for (int64_t j = 0; j < 64; j++) {
                uint16_t *o = out + (nb * 64 + j) * K;
                for (int64_t kd = 0; kd < K; kd++) o[kd] = float_to_bf16(acc[kd * 64 + j]);
            }
        }
        free(acc);
    }
}
