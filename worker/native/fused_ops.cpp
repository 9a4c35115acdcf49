// Fused element-wise layers of the Llama decoder on the CPU: RMSNorm (optionally after the residual add),
// rotary embedding in place, and SiLU(gate) * up. Each is one pass over its rows where the torch
// versions make five to eight (and allocate a temporary for each).
//
// Built and called like paged_attention.cpp (worker/native/compiler.py, ctypes on raw pointers; see
// worker/layers/fused_cpu.py). Rounding follows the torch code they replace, so a bfloat16/float16 model
// rounds where transformers does: after the residual add, after normalizing, after the weight, after the
// SiLU and after the product. float32 results differ from torch's only in summation order and in
// fused multiply-adds (a few ulp).
//
// Rows are independent: with num_threads > 1 they are split between OpenMP threads.

#include <cmath>
#include <cstdint>

#include "vector_math.h"

namespace {

template <typename T>
inline T rounded(float x) {
    T out;
    store(x, &out);
    return out;
}

// sum of squares of a row, in float, vectorized (16 partial sums) with a scalar tail.
template <typename T>
float sum_of_squares(const T* x, int64_t n) {
    f32x16 acc = {};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        f32x16 v;
        if constexpr (sizeof(T) == sizeof(float)) {
            v = load16(x + i);
        } else {
            alignas(64) float chunk[LANES];
            for (int l = 0; l < LANES; ++l) chunk[l] = to_float(x[i + l]);
            v = load16(chunk);
        }
        acc += v * v;
    }
    float total = 0.0f;
    for (int l = 0; l < LANES; ++l) total += acc[l];
    for (; i < n; ++i) total += to_float(x[i]) * to_float(x[i]);
    return total;
}

// out = weight * (x / sqrt(mean(x^2) + eps)), rounded to T after normalizing and after the weight.
template <typename T>
void norm_row(const T* x, const T* weight, T* out, int64_t hidden, float eps) {
    const float inv = 1.0f / std::sqrt(sum_of_squares(x, hidden) / float(hidden) + eps);
    int64_t i = 0;
    if constexpr (sizeof(T) == sizeof(float)) {  // nothing to round: whole vectors, then the tail
        for (; i + LANES <= hidden; i += LANES) store16(out + i, load16(weight + i) * (load16(x + i) * inv));
    }
    for (; i < hidden; ++i) store(to_float(weight[i]) * to_float(rounded<T>(to_float(x[i]) * inv)), out + i);
}

template <typename T>
void rms_norm_rows(const void* x_, const void* weight_, void* out_, int64_t rows, int64_t hidden, int64_t x_stride,
              int64_t out_stride, float eps, int num_threads) {
    const T* x = static_cast<const T*>(x_);
    const T* weight = static_cast<const T*>(weight_);
    T* out = static_cast<T*>(out_);
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) norm_row(x + r * x_stride, weight, out + r * out_stride, hidden, eps);
}

// residual += delta (rounded to T, as torch's add), then out = rms_norm(residual).
template <typename T>
void add_rms_norm_rows(void* residual_, const void* delta_, const void* weight_, void* out_, int64_t rows, int64_t hidden,
                  int64_t delta_stride, float eps, int num_threads) {
    T* residual = static_cast<T*>(residual_);
    const T* delta = static_cast<const T*>(delta_);
    const T* weight = static_cast<const T*>(weight_);
    T* out = static_cast<T*>(out_);
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        T* row = residual + r * hidden;
        const T* d = delta + r * delta_stride;
        int64_t i = 0;
        if constexpr (sizeof(T) == sizeof(float)) {
            for (; i + LANES <= hidden; i += LANES) store16(row + i, load16(row + i) + load16(d + i));
        }
        for (; i < hidden; ++i) store(to_float(row[i]) + to_float(d[i]), row + i);
        norm_row(row, weight, out + r * hidden, hidden, eps);
    }
}

// In place, per token and head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), the rotate-half form,
// cos/sin float32 tables [max_positions, head_dim / 2] looked up by the token's position.
template <typename T>
void rotate_heads(T* x, int64_t stride_token, int64_t stride_head, int64_t num_heads, int64_t token, const float* cos,
                  const float* sin, int64_t half) {
    for (int64_t h = 0; h < num_heads; ++h) {
        T* head = x + token * stride_token + h * stride_head;
        for (int64_t i = 0; i < half; ++i) {
            // torch rounds cos/sin to the activation dtype first, then each product and the sum.
            const float c = to_float(rounded<T>(cos[i])), s = to_float(rounded<T>(sin[i]));
            const float x1 = to_float(head[i]), x2 = to_float(head[half + i]);
            store(to_float(rounded<T>(x1 * c)) - to_float(rounded<T>(x2 * s)), head + i);
            store(to_float(rounded<T>(x2 * c)) + to_float(rounded<T>(x1 * s)), head + half + i);
        }
    }
}

template <typename T>
void rotary_tokens(void* query_, void* key_, const float* cos, const float* sin, const int64_t* positions, int64_t tokens,
            int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t query_stride_token,
            int64_t query_stride_head, int64_t key_stride_token, int64_t key_stride_head, int num_threads) {
    T* query = static_cast<T*>(query_);
    T* key = static_cast<T*>(key_);
    const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && tokens > 1)
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos + positions[t] * half;
        const float* s = sin + positions[t] * half;
        rotate_heads(query, query_stride_token, query_stride_head, num_q_heads, t, c, s, half);
        rotate_heads(key, key_stride_token, key_stride_head, num_kv_heads, t, c, s, half);
    }
}

// silu(g) = g * sigmoid(g), with e = exp(-|g|) <= 1 so that nothing overflows:
// sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0.
inline f32x16 silu(f32x16 g) {
    const f32x16 zero = {};
    const f32x16 e = exp_nonpositive(g < zero ? g : -g);
    return g * ((g < zero ? e : zero + 1.0f) / (e + 1.0f));
}

// out = silu(gate) * up, rounded to T after the SiLU and after the product.
template <typename T>
void silu_mul_rows(const void* gate_, const void* up_, void* out_, int64_t rows, int64_t cols, int64_t gate_stride,
              int64_t up_stride, int num_threads) {
    const T* gate = static_cast<const T*>(gate_);
    const T* up = static_cast<const T*>(up_);
    T* out = static_cast<T*>(out_);
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate + r * gate_stride;
        const T* u = up + r * up_stride;
        T* o = out + r * cols;
        int64_t i = 0;
        if constexpr (sizeof(T) == sizeof(float)) {  // nothing to round: straight through the vectors
            for (; i + LANES <= cols; i += LANES) store16(o + i, silu(load16(g + i)) * load16(u + i));
        }
        for (; i < cols; i += LANES) {
            const int n = int(cols - i < LANES ? cols - i : LANES);
            alignas(64) float chunk[LANES] = {};
            for (int l = 0; l < n; ++l) chunk[l] = to_float(g[i + l]);
            store16(chunk, silu(load16(chunk)));
            for (int l = 0; l < n; ++l) store(to_float(rounded<T>(chunk[l])) * to_float(u[i + l]), o + i + l);
        }
    }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16, for every tensor argument but the float32 rotary tables.
// Each returns 0, or -1 for an unknown dtype (rotary: or a position outside its tables). Strides are in
// elements; rows' last dimension is dense.
#define DISPATCH(dtype, call)               \
    switch (dtype) {                        \
        case 0: call(float); return 0;      \
        case 1: call(bf16); return 0;       \
        case 2: call(_Float16); return 0;   \
        default: return -1;                 \
    }

extern "C" {

int rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t hidden, int64_t x_stride,
             int64_t out_stride, float eps, int dtype, int num_threads) {
#define CALL(T) rms_norm_rows<T>(x, weight, out, rows, hidden, x_stride, out_stride, eps, num_threads)
    DISPATCH(dtype, CALL)
#undef CALL
}

// residual: [rows, hidden] dense, updated in place; out: [rows, hidden] dense.
int add_rms_norm(void* residual, const void* delta, const void* weight, void* out, int64_t rows, int64_t hidden,
                 int64_t delta_stride, float eps, int dtype, int num_threads) {
#define CALL(T) add_rms_norm_rows<T>(residual, delta, weight, out, rows, hidden, delta_stride, eps, num_threads)
    DISPATCH(dtype, CALL)
#undef CALL
}

// cos, sin: [max_positions, head_dim / 2]; positions: [tokens], each in [0, max_positions).
int rotary(void* query, void* key, const float* cos, const float* sin, const int64_t* positions, int64_t max_positions,
           int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t query_stride_token,
           int64_t query_stride_head, int64_t key_stride_token, int64_t key_stride_head, int dtype, int num_threads) {
    for (int64_t t = 0; t < tokens; ++t)
        if (positions[t] < 0 || positions[t] >= max_positions) return -1;
#define CALL(T)                                                                                                   \
    rotary_tokens<T>(query, key, cos, sin, positions, tokens, num_q_heads, num_kv_heads, head_dim, query_stride_token, \
              query_stride_head, key_stride_token, key_stride_head, num_threads)
    DISPATCH(dtype, CALL)
#undef CALL
}

// out: [rows, cols] dense.
int silu_mul(const void* gate, const void* up, void* out, int64_t rows, int64_t cols, int64_t gate_stride,
             int64_t up_stride, int dtype, int num_threads) {
#define CALL(T) silu_mul_rows<T>(gate, up, out, rows, cols, gate_stride, up_stride, num_threads)
    DISPATCH(dtype, CALL)
#undef CALL
}

}  // extern "C"
