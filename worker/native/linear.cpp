// The decoder's linear layers on the CPU (float32): out[M, N] = x[M, K] @ w[N, K]^T (+ bias), with w
// packed once at load into column panels, [ceil(N / 64)][K][64] (zeros past N), so that the product
// streams each panel front to back.
//
// Built and called like paged_attention.cpp (worker/native/compiler.py, ctypes on raw pointers; see
// worker/layers/linear_cpu.py). Why not torch's MKL sgemm: at decode batch sizes (M = 1..128) MKL
// repacks the weight on every call and waits on memory for it, so a 24M-parameter model's step spent
// 27 ms in it at M = 64; here the packing is done once and the next panel is prefetched while the
// current one is multiplied (docs/benchmarks.md: ~1.2-1.3x faster at M = 8-64, level at M = 2048 and at M = 1).
//
// Each output element is one sum over k = 0..K-1 in order, whatever M, the panel split between threads
// or the row's place in a block: a row's result does not depend on the other rows of the batch.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vector_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int PANEL = 64;                   // columns per panel
constexpr int PANEL_VECTORS = PANEL / LANES;
constexpr int BLOCK_ROWS = 6;               // rows per pass: 6 x 4 accumulators + 4 weight vectors in registers
constexpr int64_t LINE = 64;                // bytes per cache line

// Rows [0, ROWS) of x against one panel: ROWS x PANEL accumulators over k, then stored (the first
// `columns` of them when the panel runs past N). While it runs, `prefetch_lines` cache lines of the
// next panel are requested, spread evenly over the k steps.
template <int ROWS>
void panel_rows(const float* x, int64_t x_stride, const float* panel, const float* bias, int64_t K, float* out,
                int64_t out_stride, int columns, const char* prefetch, int64_t prefetch_lines) {
    f32x16 acc[ROWS][PANEL_VECTORS];
    for (int c = 0; c < PANEL_VECTORS; ++c) {
        const f32x16 b = bias != nullptr ? load16(bias + LANES * c) : f32x16{};
        for (int r = 0; r < ROWS; ++r) acc[r][c] = b;
    }
    int64_t line = 0;
    for (int64_t k = 0; k < K; ++k) {
        for (const int64_t stop = (k + 1) * prefetch_lines / K; line < stop; ++line) __builtin_prefetch(prefetch + line * LINE, 0, 2);
        f32x16 w[PANEL_VECTORS];
        for (int c = 0; c < PANEL_VECTORS; ++c) w[c] = load16(panel + k * PANEL + LANES * c);
        for (int r = 0; r < ROWS; ++r) {
            const float a = x[r * x_stride + k];
            for (int c = 0; c < PANEL_VECTORS; ++c) acc[r][c] += a * w[c];
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        if (columns == PANEL) {
            for (int c = 0; c < PANEL_VECTORS; ++c) store16(out + r * out_stride + LANES * c, acc[r][c]);
        } else {
            alignas(64) float row[PANEL];
            for (int c = 0; c < PANEL_VECTORS; ++c) store16(row + LANES * c, acc[r][c]);
            std::memcpy(out + r * out_stride, row, columns * sizeof(float));
        }
    }
}

using PanelRows = void (*)(const float*, int64_t, const float*, const float*, int64_t, float*, int64_t, int, const char*, int64_t);
constexpr PanelRows TAIL_ROWS[BLOCK_ROWS] = {nullptr, panel_rows<1>, panel_rows<2>, panel_rows<3>, panel_rows<4>, panel_rows<5>};

// All M rows against panel p, prefetching panel `next` (or nothing: nullptr) across the passes.
void multiply_panel(const float* x, int64_t M, int64_t K, int64_t x_stride, const float* packed, const float* bias, int64_t N,
                    float* out, int64_t p, const float* next) {
    const float* panel = packed + p * K * PANEL;
    const float* panel_bias = bias != nullptr ? bias + p * PANEL : nullptr;
    const int columns = int(std::min<int64_t>(PANEL, N - p * PANEL));
    const int64_t next_lines = next != nullptr ? K * PANEL * int64_t(sizeof(float)) / LINE : 0;
    const int64_t passes = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const int64_t lines_per_pass = (next_lines + passes - 1) / passes;
    int64_t pass = 0;
    for (int64_t m = 0; m < M; m += BLOCK_ROWS, ++pass) {
        const int64_t first_line = std::min(next_lines, pass * lines_per_pass);
        const char* prefetch = reinterpret_cast<const char*>(next) + first_line * LINE;
        const int64_t lines = std::min(lines_per_pass, next_lines - first_line);
        const int64_t rows = std::min<int64_t>(BLOCK_ROWS, M - m);
        const PanelRows kernel = rows == BLOCK_ROWS ? panel_rows<BLOCK_ROWS> : TAIL_ROWS[rows];
        kernel(x + m * x_stride, x_stride, panel, panel_bias, K, out + m * N + p * PANEL, N, columns, prefetch, lines);
    }
}

}  // namespace

extern "C" {

// packed[p][k][j] = w[p * 64 + j][k] for the [N, K] weight w (row-major), zeros past N. Returns 0.
int pack_linear_weight(const float* w, int64_t N, int64_t K, float* packed) {
    const int64_t panels = (N + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t k = 0; k < K; ++k)
            for (int j = 0; j < PANEL; ++j) {
                const int64_t n = p * PANEL + j;
                packed[(p * K + k) * PANEL + j] = n < N ? w[n * K + k] : 0.0f;
            }
    return 0;
}

// out[M, N] (contiguous) = x[M, K] (rows x_stride floats apart) @ w^T + bias, w packed by
// pack_linear_weight, bias (nullable) padded with zeros to a whole number of panels. Panels are split
// between num_threads OpenMP threads. Returns 0, or -1 for negative sizes.
int linear(const float* x, int64_t M, int64_t K, int64_t x_stride, const float* packed, const float* bias, int64_t N,
           float* out, int num_threads) {
    if (M < 0 || K < 0 || N < 0 || x_stride < K) return -1;
    const int64_t panels = (N + PANEL - 1) / PANEL;
    if (M == 0 || panels == 0) return 0;
    const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, panels)));
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int64_t thread = omp_get_thread_num(), count = omp_get_num_threads();
#else
        const int64_t thread = 0, count = 1;
#endif
        // Contiguous panel ranges, so that each thread prefetches the panel it takes next.
        const int64_t begin = panels * thread / count, end = panels * (thread + 1) / count;
        for (int64_t p = begin; p < end; ++p) {
            const float* next = p + 1 < end ? packed + (p + 1) * K * PANEL : nullptr;
            multiply_panel(x, M, K, x_stride, packed, bias, N, out, p, next);
        }
    }
    return 0;
}

}  // extern "C"
