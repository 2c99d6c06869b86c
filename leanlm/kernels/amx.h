/* The int4 kernel's products on AMX tiles (amx.cpp). `int4_mm` returns false where it does not apply (no AMX on
 * this CPU or for this process, switched off by `allow(false)`, fewer than MIN_ROWS rows) and the caller runs its VNNI loops. */
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace amx {

constexpr int64_t MIN_ROWS = 32;  // below this the VNNI loops are as fast (bench/NOTES.md)

bool usable();             // granted to this process and allowed
bool granted_here();       // granted to this process (the CPU has AMX and Linux lets it use the tiles)
void allow(bool on);       // the kernel plan's switch (kernels/plan.py), for the whole process

// int4_vnni.cpp's int4_mm after quantising x: y (M, N) = x W^T, W in the "vnni" layout with H bit planes,
// scales and minimums per group (or per half group: s16)
struct Int4Args {
    const int8_t *xq;
    const float *dx, *sx;
    const uint8_t *w;
    const uint16_t *sc, *mn;
    void *y;
    bool bf16, s16;
    int64_t M, N, K;
    int H;
};
bool int4_mm(const Int4Args &a);

}  // namespace amx
