/* The int4 kernel's integer dot products on AMX tiles (Intel Sapphire Rapids and later), for prompts: int4_vnni.cpp
 * calls `amx::int4_mm` for 32 rows or more where the CPU has AMX-INT8 and the kernel lets this process use it;
 * otherwise, and for fewer rows, it runs its own `vpdpbusd` loops.
 *
 * One `tdpbsud` computes a whole (rows x 16 outputs x 32 inputs) block of a group's integer sums in the AMX
 * unit, leaving the vector unit the scaling (4 ops per row, group and 16 outputs, where VNNI adds 8 `vpdpbusd`).
 * Below 32 rows the scaling, not the dot products, bounds the work, so tiles do not pay there; the int8 head keeps
 * its own loops for the same reason (numbers in bench/NOTES.md).
 *
 * The same numbers as the VNNI kernels, bit for bit: a group's dot product of int8 activations and codes is an
 * exact int32 either way, and the fp32 scaling that follows is the same instructions in the same order
 * (tests/test_native.py compares both). So a batch, a prompt or a speculative block scores each row exactly
 * like the other paths.
 *
 * Tiles: A = activations (R rows x 32 int8 of one group, read in place from the quantised rows, stride K),
 * B = codes (8 rows x 64 bytes: row i holds, for each of 16 outputs, the 4 codes at inputs 4 i .. 4 i + 3 --
 * exactly one vector of int4_vnni.cpp's layout, so a group of a tile is one B tile once its nibbles are
 * spread to bytes), C = R x 16 int32 sums. With 16-wide scales
 * (Q6_K) each half group is its own product (A 16 bytes wide, B 4 rows).
 * Linux hands out AMX state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it the first
 * tile instruction would kill the process, so `usable()` asks once and says no where it was refused.
 * `amx_allow(false)` switches these kernels off for the process (kernels/plan.py calls it with the plan's `amx`
 * when a model is planned; tests compare both paths in one process).
 */
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "amx.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vnni.h"

namespace {

struct alignas(64) TileConfig {  // the LDTILECFG operand (palette 1)
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Tiles 0, 1: C (two products in flight); 2, 3: A; 4, 5: B. R rows of activations, NS products per group.
void configure(int R, int NS) {
    TileConfig c;
    for (int i = 0; i < 2; i++) {
        c.rows[i] = (uint8_t)R, c.colsb[i] = 64;
        c.rows[2 + i] = (uint8_t)R, c.colsb[2 + i] = (uint16_t)(32 / NS);
        c.rows[4 + i] = (uint8_t)(8 / NS), c.colsb[4 + i] = 64;
    }
    asm volatile("" : : "r"(&c) : "memory");  // GCC 12 drops the stores above as dead without it
    _tile_loadconfig(&c);
}

// Two products C0 = A0 B0 and C1 = A1 B1 (A: R rows, stride lda; B: rows of 64 bytes), stored to c0 and c1
// (R x 16 int32 each). Tile numbers are immediates, hence one function for the pair.
inline void two_products(const int8_t *a0, const int8_t *a1, int64_t lda, const uint8_t *b0, const uint8_t *b1,
                         int32_t *c0, int32_t *c1) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(2, a0, lda);
    _tile_loadd(4, b0, 64);
    _tile_loadd(3, a1, lda);
    _tile_loadd(5, b1, 64);
    _tile_dpbsud(0, 2, 4);
    _tile_dpbsud(1, 3, 5);
    _tile_stored(0, c0, 64);
    _tile_stored(1, c1, 64);
}

// Rows up to 16 at a time, in blocks of 16, 8, 4, 2, 1 (compile-time counts: accumulators in registers).
template <typename Block>
void in_blocks(int64_t M, Block block) {
    int64_t m0 = 0;
    for (; M - m0 >= 16; m0 += 16) block.template run<16>(m0);
    if (M - m0 >= 8) block.template run<8>(m0), m0 += 8;
    if (M - m0 >= 4) block.template run<4>(m0), m0 += 4;
    if (M - m0 >= 2) block.template run<2>(m0), m0 += 2;
    if (M - m0 >= 1) block.template run<1>(m0);
}

// One tile of 16 outputs of int4_mm for all M rows. Its codes are spread to bytes once (G x 512 bytes), then
// each block of rows takes the groups' products two at a time and scales them as int4_vnni.cpp's tile() does.
template <int H, int NS>
struct Int4Tile {
    const amx::Int4Args &a;
    const uint8_t *codes;  // this tile's groups as B tiles
    int64_t t;
    int *configured;  // rows the tiles are configured for (0: none yet)
    template <int R>
    void run(int64_t m0) const {
        const int64_t G = a.K / 32, U = G * NS;  // products per row block
        if (*configured != R) configure(R, NS), *configured = R;
        alignas(64) int32_t c[2][16 * 16];
        __m512 acc[R];
#pragma GCC unroll 16
        for (int j = 0; j < R; j++) acc[j] = _mm512_setzero_ps();
        const int8_t *x = a.xq + m0 * a.K;
        for (int64_t u0 = 0; u0 < U; u0 += 2) {
            const int64_t u1 = u0 + 1 < U ? u0 + 1 : u0;  // an odd last product is computed twice, used once
            two_products(x + u0 * 32 / NS, x + u1 * 32 / NS, a.K, codes + u0 * 512 / NS, codes + u1 * 512 / NS, c[0], c[1]);
            for (int64_t u = u0; u < u0 + 2 && u < U; u++) {  // product u: group g, half e
                const int64_t g = u / NS, e = u % NS, at = ((t * NS * G + NS * g + e) * 16);
                const __m512 s16 = vnni::f16x16(a.sc + at), b16 = vnni::f16x16(a.mn + at);
                const int32_t *cu = c[u - u0];
#pragma GCC unroll 16
                for (int j = 0; j < R; j++) {
                    const __m512 dsum = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(cu + j * 16)));
                    acc[j] = _mm512_fmadd_ps(dsum, _mm512_mul_ps(s16, _mm512_set1_ps(a.dx[(m0 + j) * G + g])), acc[j]);
                    acc[j] = _mm512_fmadd_ps(b16, _mm512_set1_ps(a.sx[(m0 + j) * NS * G + NS * g + e]), acc[j]);
                }
            }
        }
        for (int j = 0; j < R; j++) {
            const int64_t i = (m0 + j) * a.N + t * 16;
            if (a.bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)a.y + i), (__m256i)_mm512_cvtneps_pbh(acc[j]));
            else _mm512_storeu_ps((float *)a.y + i, acc[j]);
        }
    }
};

template <int H, int NS>
void int4_tiles(const amx::Int4Args &a) {
    const int64_t G = a.K / 32, GS = 256 + 64 * H;
    at::parallel_for(0, a.N / 16, 1, [&](int64_t t0, int64_t t1) {
        std::vector<__m512i> codes(G * 8);  // 64-byte aligned
        int configured = 0;
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t g = 0; g < G; g++)  // each group's codes as bytes: one B tile
                vnni::spread_group<H>(a.w + (t * G + g) * GS, codes.data() + g * 8);
            in_blocks(a.M, Int4Tile<H, NS>{a, (const uint8_t *)codes.data(), t, &configured});
        }
        if (configured) _tile_release();
    });
}

bool granted() {
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18): 0 once this process may use tiles
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

}  // namespace

namespace amx {

std::atomic<bool> allowed{true};

void allow(bool on) { allowed.store(on, std::memory_order_relaxed); }

bool granted_here() {
    static const bool ok = granted();
    return ok;
}

bool usable() { return granted_here() && allowed.load(std::memory_order_relaxed); }

bool int4_mm(const Int4Args &a) {
    const int NS = a.s16 ? 2 : 1;
    if (a.M < MIN_ROWS || !usable() || (a.H != 0 && a.H != 1 && a.H != 2 && a.H != 4) || (a.s16 && a.H != 2))
        return false;
    if (NS == 2) return int4_tiles<2, 2>(a), true;
    switch (a.H) {
        case 0: int4_tiles<0, 1>(a); break;
        case 1: int4_tiles<1, 1>(a); break;
        case 2: int4_tiles<2, 1>(a); break;
        default: int4_tiles<4, 1>(a); break;
    }
    return true;
}

}  // namespace amx

#else

namespace amx {
void allow(bool) {}
bool granted_here() { return false; }
bool usable() { return false; }
bool int4_mm(const Int4Args &) { return false; }
}  // namespace amx

#endif

// kernels/plan.py: amx_usable, whether this CPU and process have the tiles; amx_allow, whether prompts take them
TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("amx_usable() -> bool");
    m.def("amx_allow(bool on) -> ()");
}
TORCH_LIBRARY_IMPL(leanlm_native, CatchAll, m) {
    m.impl("amx_usable", [] { return amx::granted_here(); });
    m.impl("amx_allow", [](bool on) { amx::allow(on); });
}
