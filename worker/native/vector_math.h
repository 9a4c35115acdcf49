// Vector helpers shared by the CPU kernels (paged_attention.cpp, fused_ops.cpp).
//
// Written with GCC/Clang vector extensions: the compiler maps a 16-float vector onto one AVX-512
// register, two AVX2 registers or four NEON registers, whatever -march=native offers.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

constexpr int LANES = 16;  // floats per vector

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

struct bf16 {
    uint16_t bits;
};

static inline float to_float(float x) { return x; }
static inline float to_float(bf16 x) {
    uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
static inline float to_float(_Float16 x) { return float(x); }

static inline void store(float x, float* out) { *out = x; }
static inline void store(float x, bf16* out) {
    // Round to nearest even, as torch's float -> bfloat16 conversion does; NaN stays a (quiet) NaN.
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if (std::isnan(x)) {
        out->bits = uint16_t((u >> 16) | 0x40);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out->bits = uint16_t(u >> 16);
}
static inline void store(float x, _Float16* out) { *out = _Float16(x); }

static inline f32x16 load16(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
static inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// e^x for x <= 0 (softmax scores minus their maximum, the SiLU's -|g|): Cephes' expf polynomial after the
// range reduction x = n ln2 + r, then 2^n built in the exponent bits. Relative error ~2 ulp; x below -87
// gives ~e^-87 where the exact value would be a denormal or 0 (attention zeroes its masked keys itself).
static inline f32x16 exp_nonpositive(f32x16 x) {
    const f32x16 lowest = f32x16{} - 87.0f;
    x = x < lowest ? lowest : x;
    f32x16 n = x * 1.44269504088896341f;
    // Round to nearest: shift by 1.5 * 2^23 (valid for |n| < 2^22), subtract it back.
    n = (n + 12582912.0f) - 12582912.0f;
    f32x16 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i32x16 exponent = (__builtin_convertvector(n, i32x16) + 127) << 23;
    f32x16 scale;
    std::memcpy(&scale, &exponent, sizeof scale);
    return p * scale;
}
