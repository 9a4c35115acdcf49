// The tile math of the CPU paged attention (paged_attention.cpp): scores of a set of query rows against
// a tile of KEY_TILE keys, the online softmax over them, and the probability-weighted sum of the values.
//
// Rows and key rows are head_dim floats padded with zeros to a whole number of vectors, `nv` of them
// (`width` = LANES * nv floats). The templates take NV = nv as a constant for nv <= MAX_VECTORS (loops
// fully unrolled, accumulators in registers) and NV = 0 for larger head dims, where `nv` is read at run
// time. Scores come two ways:
//   - dot_scores, for a few rows (decode): dot products straight from the key rows, sixteen keys' partial
//     sums in sixteen registers, then one transposing reduction per row and sixteen keys;
//   - transposed_scores, for many rows (prefill chunks, a shared prefix seen by many decode rows): the key
//     tile is transposed once ([width][KEY_TILE], sixteen-by-sixteen blocks in registers) and every row's
//     KEY_TILE scores are `width` broadcast multiply-adds, SCORE_ROWS rows at a time.
// accumulate_rows adds probs x values to blocks of rows at once, so that each value vector loaded serves
// every row of the block (the register budget sets the block: ~16 accumulators).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vector_math.h"

constexpr int KEY_VECTORS = 4;                // score vectors per row and key tile
constexpr int KEY_TILE = LANES * KEY_VECTORS; // key positions per tile
constexpr int MAX_VECTORS = 16;               // padded head_dim / 16 with unrolled kernels (up to 256)
constexpr int SCORE_ROWS = 4;                 // rows whose scores the transposed path computes together

// The scores of a row against a key tile, and after online_softmax its weights: KEY_TILE floats.
struct TileScores {
    f32x16 v[KEY_VECTORS];
    const float* probs() const { return reinterpret_cast<const float*>(v); }
};

// Reductions of one vector to a scalar, as a tree of halvings.
inline float reduce_max(f32x16 v) {
    auto h8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    auto l8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    auto m8 = h8 > l8 ? h8 : l8;
    auto h4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3);
    auto l4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
    auto m4 = h4 > l4 ? h4 : l4;
    return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
}

inline float reduce_sum(f32x16 v) {
    auto s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    auto s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
    return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

// Lane j of the result is the sum of the lanes of v[j]: four rounds that each halve the number of
// vectors by adding the matching halves of two of them (a transpose folded into the reduction).
inline f32x16 sum_each(const f32x16 v[LANES]) {
    f32x16 h[8], q[4], e[2];
    for (int i = 0; i < 8; ++i)
        h[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        q[i] = __builtin_shufflevector(h[2 * i], h[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(h[2 * i], h[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        e[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(q[2 * i], q[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane l of the two halves swap_blocks<B> makes of vectors a and b (b's lanes numbered from LANES).
template <int B>
constexpr int low_lane(int l) { return (l & B) ? LANES + l - B : l; }
template <int B>
constexpr int high_lane(int l) { return (l & B) ? LANES + l : l + B; }

// One round of a transpose: between vectors i and i + B (i without bit B), swap the off-diagonal
// B x B sub-blocks.
template <int B>
inline void swap_blocks(f32x16 v[LANES]) {
    for (int i = 0; i < LANES; ++i) {
        if (i & B) continue;
        const f32x16 a = v[i], b = v[i + B];
        v[i] = __builtin_shufflevector(a, b, low_lane<B>(0), low_lane<B>(1), low_lane<B>(2), low_lane<B>(3), low_lane<B>(4),
                                       low_lane<B>(5), low_lane<B>(6), low_lane<B>(7), low_lane<B>(8), low_lane<B>(9),
                                       low_lane<B>(10), low_lane<B>(11), low_lane<B>(12), low_lane<B>(13), low_lane<B>(14),
                                       low_lane<B>(15));
        v[i + B] = __builtin_shufflevector(a, b, high_lane<B>(0), high_lane<B>(1), high_lane<B>(2), high_lane<B>(3),
                                           high_lane<B>(4), high_lane<B>(5), high_lane<B>(6), high_lane<B>(7), high_lane<B>(8),
                                           high_lane<B>(9), high_lane<B>(10), high_lane<B>(11), high_lane<B>(12),
                                           high_lane<B>(13), high_lane<B>(14), high_lane<B>(15));
    }
}

// Transpose sixteen vectors in place (v[i][j] becomes v[j][i]): swapping sub-blocks of size 8, 4, 2, 1.
inline void transpose16(f32x16 v[LANES]) {
    swap_blocks<8>(v);
    swap_blocks<4>(v);
    swap_blocks<2>(v);
    swap_blocks<1>(v);
}

// keys_t[d][j] = key_rows[j][d] for the tile's KEY_TILE keys and all `width` dims.
inline void transpose_keys(const float* const* key_rows, int64_t width, float* keys_t) {
    for (int kv = 0; kv < KEY_VECTORS; ++kv) {
        const float* const* keys = key_rows + kv * LANES;
        for (int64_t d0 = 0; d0 < width; d0 += LANES) {
            f32x16 block[LANES];
            for (int j = 0; j < LANES; ++j) block[j] = load16(keys[j] + d0);
            transpose16(block);
            for (int i = 0; i < LANES; ++i) store16(keys_t + (d0 + i) * KEY_TILE + kv * LANES, block[i]);
        }
    }
}

// Decode path: the scores of a few rows against the first `num_vectors_used` sixteens of the tile.
template <int NV>
void dot_scores(const float* q, int rows, const float* const* key_rows, int num_vectors_used, TileScores* scores, int nv) {
    if constexpr (NV > 0) nv = NV;
    const int64_t width = int64_t(LANES) * nv;
    for (int r = 0; r < rows; ++r) {
        for (int kv = 0; kv < num_vectors_used; ++kv) {
            const float* const* keys = key_rows + kv * LANES;
            f32x16 partial[LANES] = {};
            for (int c = 0; c < nv; ++c) {
                const f32x16 qc = load16(q + r * width + LANES * c);
                for (int j = 0; j < LANES; ++j) partial[j] += qc * load16(keys[j] + LANES * c);
            }
            scores[r].v[kv] = sum_each(partial);
        }
    }
}

// Many-rows path: every row's scores from the transposed tile, SCORE_ROWS rows per pass so that each
// key vector loaded serves several rows.
inline void transposed_scores(const float* q, int rows, int64_t width, const float* keys_t, TileScores* scores) {
    const int last = rows - 1;
    for (int r0 = 0; r0 < rows; r0 += SCORE_ROWS) {
        TileScores block[SCORE_ROWS] = {};
        const float* row_q[SCORE_ROWS];
        // Past the last row, recompute the last one rather than branch in the inner loop.
        for (int b = 0; b < SCORE_ROWS; ++b) row_q[b] = q + std::min(r0 + b, last) * width;
        for (int64_t d = 0; d < width; ++d) {
            f32x16 k[KEY_VECTORS];
            for (int kv = 0; kv < KEY_VECTORS; ++kv) k[kv] = load16(keys_t + d * KEY_TILE + kv * LANES);
            for (int b = 0; b < SCORE_ROWS; ++b) {
                const float qd = row_q[b][d];
                for (int kv = 0; kv < KEY_VECTORS; ++kv) block[b].v[kv] += qd * k[kv];
            }
        }
        for (int b = 0; b < SCORE_ROWS && r0 + b < rows; ++b) scores[r0 + b] = block[b];
    }
}

// Fold one row's scores for the tile (its first `visible` keys count, 0 < visible <= KEY_TILE) into its
// running max and sum; turns the scores into the tile's weights (zero past `visible`) and returns the
// factor the row's accumulator must be rescaled by.
inline float online_softmax(TileScores& scores, int visible, float& row_max, float& row_sum) {
    const int used = (visible + LANES - 1) / LANES;  // score vectors holding visible keys
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const f32x16 zero = {};
    const f32x16 minus_infinity = zero - INFINITY;
    f32x16 tile_max = minus_infinity;
    for (int kv = 0; kv < used; ++kv) {
        const i32x16 masked = lane + kv * LANES >= visible;
        scores.v[kv] = masked ? minus_infinity : scores.v[kv];
        tile_max = scores.v[kv] > tile_max ? scores.v[kv] : tile_max;
    }
    const float new_max = std::max(row_max, reduce_max(tile_max));
    const float rescale = row_max == new_max ? 1.0f : std::exp(row_max - new_max);  // exp(-inf) = 0 at first
    f32x16 total = zero;
    for (int kv = 0; kv < KEY_VECTORS; ++kv) {
        if (kv < used) {
            const i32x16 masked = lane + kv * LANES >= visible;
            const f32x16 p = exp_nonpositive(scores.v[kv] - new_max);
            scores.v[kv] = masked ? zero : p;
            total += scores.v[kv];
        } else {
            scores.v[kv] = zero;
        }
    }
    row_sum = row_sum * rescale + reduce_sum(total);
    row_max = new_max;
    return rescale;
}

// acc[b] = acc[b] * rescale[b] + sum_j probs[b][j] * value_rows[j] for RB rows at once (accumulators of
// row b at acc + b * width), the RB * NV accumulators in registers.
template <int NV, int RB>
void accumulate_block(float* acc, const float* rescale, const TileScores* probs, const float* const* value_rows, int num_keys) {
    constexpr int64_t width = int64_t(LANES) * NV;
    f32x16 a[RB][NV];
    for (int b = 0; b < RB; ++b)
        for (int c = 0; c < NV; ++c) a[b][c] = load16(acc + b * width + LANES * c) * rescale[b];
    for (int j = 0; j < num_keys; ++j) {
        f32x16 v[NV];
        for (int c = 0; c < NV; ++c) v[c] = load16(value_rows[j] + LANES * c);
        for (int b = 0; b < RB; ++b) {
            const float p = probs[b].probs()[j];
            for (int c = 0; c < NV; ++c) a[b][c] += p * v[c];
        }
    }
    for (int b = 0; b < RB; ++b)
        for (int c = 0; c < NV; ++c) store16(acc + b * width + LANES * c, a[b][c]);
}

// Rows per block: about sixteen accumulators (NV vectors a row), at most eight rows.
template <int NV>
constexpr int block_rows() {
    return std::max(1, std::min(8, 16 / NV));
}

// The last rows % block_rows<NV>() rows: the block kernel for exactly that many.
template <int NV, int RB>
void accumulate_tail(float* acc, const float* rescale, const TileScores* probs, const float* const* value_rows, int num_keys, int rows) {
    if constexpr (RB > 0) {
        if (rows == RB)
            accumulate_block<NV, RB>(acc, rescale, probs, value_rows, num_keys);
        else
            accumulate_tail<NV, RB - 1>(acc, rescale, probs, value_rows, num_keys, rows);
    }
}

// All `rows` rows (row r's accumulators at acc + r * width) over the tile's first num_keys values.
template <int NV>
void accumulate_rows(float* acc, const float* rescale, const TileScores* probs, const float* const* value_rows, int num_keys, int rows, int nv) {
    if constexpr (NV > 0) {
        constexpr int RB = block_rows<NV>();
        constexpr int64_t width = int64_t(LANES) * NV;
        int r = 0;
        for (; r + RB <= rows; r += RB) accumulate_block<NV, RB>(acc + r * width, rescale + r, probs + r, value_rows, num_keys);
        accumulate_tail<NV, RB - 1>(acc + r * width, rescale + r, probs + r, value_rows, num_keys, rows - r);
    } else {
        const int64_t width = int64_t(LANES) * nv;
        for (int r = 0; r < rows; ++r) {
            const float* p = probs[r].probs();
            for (int c = 0; c < nv; ++c) {
                float* row = acc + r * width + LANES * c;
                f32x16 a = load16(row) * rescale[r];
                for (int j = 0; j < num_keys; ++j) a += p[j] * load16(value_rows[j] + LANES * c);
                store16(row, a);
            }
        }
    }
}

using DotScores = void (*)(const float*, int, const float* const*, int, TileScores*, int);
using AccumulateRows = void (*)(float*, const float*, const TileScores*, const float* const*, int, int, int);

// Function tables indexed by nv (entry 0: the run-time nv versions, for head dims above 16 * MAX_VECTORS).
template <int... NV>
struct VectorKernels {
    static constexpr DotScores dot[] = {dot_scores<0>, dot_scores<NV>...};
    static constexpr AccumulateRows accumulate[] = {accumulate_rows<0>, accumulate_rows<NV>...};
};
using Kernels = VectorKernels<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;
