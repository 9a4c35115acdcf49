// Paged attention on the CPU, reading K/V pages in place through the block tables.
//
// Built at first use by worker/native/compiler.py with the system C++ compiler (-O3 -march=native) and
// called through ctypes on raw tensor pointers (worker/attention/cpu_ops.py), so it needs no torch headers.
//
// Layout (as worker/attention/metadata.py and worker/kv_cache.py define it):
//   query, out  [T, Hq, D]                       rows of the flattened batch, strides given in elements
//   k/v cache   [num_blocks, block_size, Hkv, D] contiguous
//   block_tables[B, stride] int32, query_start_loc [B + 1] int32, seq_lens [B] int32
// Sequence b's new tokens are rows query_start_loc[b] .. query_start_loc[b + 1] - 1 and sit at positions
// seq_lens[b] - query_len .. seq_lens[b] - 1; each attends causally to positions 0 .. its own.
//
// A work item is (sequence, tile of query positions, range of KV heads). Its rows are every (query
// position, query head) pair of the tile, grouped by the KV head they share (GQA), so each key read from
// a page serves all the query heads of its group. Keys are taken KEY_TILE positions at a time whatever
// the page size (block_size 1 runs at full tile width), and for each key tile the item's KV heads are
// visited in order, so a slot's heads, adjacent in the page, are read front to back. Softmax is online,
// in fp32.
//
// Scores come two ways. Decode tiles (a few rows per KV head) take dot products straight from the key
// rows: sixteen keys' partial sums in sixteen registers, then one transposing reduction. Prefill tiles
// (many rows) transpose the key tile once ([D][KEY_TILE]) and give every row KEY_TILE scores in
// D broadcast multiply-adds. Values are read in place (fp32) or converted once per tile (bf16/fp16).
//
// The vector helpers (vector_math.h) are shared with fused_ops.cpp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int KEY_VECTORS = 4;                // score vectors per row and key tile
constexpr int KEY_TILE = LANES * KEY_VECTORS; // key positions per tile
constexpr int MAX_GROUP_ROWS = 64;            // rows (positions x query heads) per KV head in a work item
constexpr int DOT_ROWS = 8;                   // at most this many rows per KV head: the dot-product path
constexpr int ROW_BLOCK = 4;                  // rows whose scores the transposed path computes together
constexpr int MAX_VECTORS = 16;               // padded head_dim / 16 with unrolled kernels (up to 256)

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

// The scores of a row against a key tile: KEY_VECTORS vectors of LANES keys.
struct TileScores {
    f32x16 v[KEY_VECTORS];
};

// Rows of head_dim floats are padded with zeros to a whole number of vectors, `nv` of them. The
// templates below take NV = nv as a constant for nv <= MAX_VECTORS (loops fully unrolled, accumulators in
// registers) and NV = 0 for larger head dims, where `nv` is read at run time.

// Decode path: the scores of a few rows against the first `num_vectors_used` sixteens of the tile, each
// a dot product taken straight from the key rows. Sixteen accumulators (one per key) keep the
// multiply-adds pipelined; one transposing reduction turns them into a score vector.
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

// acc = acc * rescale + sum_j probs[j] * value_rows[j], the row's nv accumulators in registers.
template <int NV>
void accumulate_values(float* acc, float rescale, const float* probs, const float* const* value_rows, int num_keys, int nv) {
    if constexpr (NV > 0) {
        f32x16 a[NV];
        for (int c = 0; c < NV; ++c) a[c] = load16(acc + LANES * c) * rescale;
        for (int j = 0; j < num_keys; ++j) {
            const float p = probs[j];
            for (int c = 0; c < NV; ++c) a[c] += p * load16(value_rows[j] + LANES * c);
        }
        for (int c = 0; c < NV; ++c) store16(acc + LANES * c, a[c]);
    } else {
        for (int c = 0; c < nv; ++c) {
            f32x16 a = load16(acc + LANES * c) * rescale;
            for (int j = 0; j < num_keys; ++j) a += probs[j] * load16(value_rows[j] + LANES * c);
            store16(acc + LANES * c, a);
        }
    }
}

// The same for two rows over the same keys (two query heads of a GQA group at one position): each value
// vector loaded once serves both. (Scores stay one row at a time: pairing them, eight keys per round,
// was 13% faster on keys already in cache but 6% slower on keys streamed from memory.)
template <int NV>
void accumulate_values_pair(float* acc0, float* acc1, float rescale0, float rescale1, const float* probs0,
                            const float* probs1, const float* const* value_rows, int num_keys, int nv) {
    if constexpr (NV > 0) {
        f32x16 a0[NV], a1[NV];
        for (int c = 0; c < NV; ++c) {
            a0[c] = load16(acc0 + LANES * c) * rescale0;
            a1[c] = load16(acc1 + LANES * c) * rescale1;
        }
        for (int j = 0; j < num_keys; ++j) {
            const float p0 = probs0[j], p1 = probs1[j];
            for (int c = 0; c < NV; ++c) {
                const f32x16 v = load16(value_rows[j] + LANES * c);
                a0[c] += p0 * v;
                a1[c] += p1 * v;
            }
        }
        for (int c = 0; c < NV; ++c) {
            store16(acc0 + LANES * c, a0[c]);
            store16(acc1 + LANES * c, a1[c]);
        }
    } else {
        accumulate_values<0>(acc0, rescale0, probs0, value_rows, num_keys, nv);
        accumulate_values<0>(acc1, rescale1, probs1, value_rows, num_keys, nv);
    }
}

using DotScores = void (*)(const float*, int, const float* const*, int, TileScores*, int);
using Accumulate = void (*)(float*, float, const float*, const float* const*, int, int);
using AccumulatePair = void (*)(float*, float*, float, float, const float*, const float*, const float* const*, int, int);

// Function tables indexed by nv (entry 0: the run-time nv versions, for head dims above 16 * MAX_VECTORS).
template <int... NV>
struct VectorKernels {
    static constexpr DotScores dot[] = {dot_scores<0>, dot_scores<NV>...};
    static constexpr Accumulate accumulate[] = {accumulate_values<0>, accumulate_values<NV>...};
    static constexpr AccumulatePair accumulate_pair[] = {accumulate_values_pair<0>, accumulate_values_pair<NV>...};
};
using Kernels = VectorKernels<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

struct Problem {
    const void* query;
    void* out;
    const void* k_cache;
    const void* v_cache;
    const int32_t* block_tables;
    const int32_t* query_start_loc;
    const int32_t* seq_lens;
    int64_t num_seqs;
    int64_t num_q_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t block_size;
    int64_t block_table_stride;
    int64_t query_stride_token;
    int64_t query_stride_head;
    int64_t out_stride_token;
    int64_t out_stride_head;
    float scale;
};

struct WorkItem {
    int32_t seq;
    int32_t first_query;  // index of the tile's first query position within the sequence's new tokens
    int32_t num_queries;
    int32_t kv_head_begin;  // the KV heads [begin, end) this item attends for
    int32_t kv_head_end;
};

// Per-thread scratch, sized for the largest work item. Row widths are the padded head_dim.
struct Scratch {
    std::vector<float> query;        // [rows][width], pre-scaled
    std::vector<float> acc;          // [rows][width]
    std::vector<float> row_max;      // [rows]
    std::vector<float> row_sum;      // [rows]
    std::vector<TileScores> scores;  // [MAX_GROUP_ROWS]: one KV head's rows against the current key tile
    std::vector<float> keys_t;       // [width][KEY_TILE], the transposed path only
    std::vector<float> keys;         // [KEY_TILE + 1][width]: keys copied/converted when they must be, then zeros
    std::vector<float> values;       // [KEY_TILE][width]
    int64_t width;
    Scratch(int64_t max_rows, int64_t width)
        : query(max_rows * width, 0.0f),
          acc(max_rows * width),
          row_max(max_rows),
          row_sum(max_rows),
          scores(MAX_GROUP_ROWS),
          keys_t(width * KEY_TILE),
          keys((KEY_TILE + 1) * width, 0.0f),
          values(KEY_TILE * width, 0.0f),
          width(width) {}
    const float* zero_row() const { return keys.data() + KEY_TILE * width; }
};

// Prefill path: transpose the key tile once, then every row's KEY_TILE scores are `width` vector
// multiply-adds, ROW_BLOCK rows at a time so that each loaded key vector serves several rows.
void transposed_scores(const float* q, int rows, int64_t width, const float* const* key_rows, Scratch& scratch) {
    float* keys_t = scratch.keys_t.data();
    for (int j = 0; j < KEY_TILE; ++j)
        for (int64_t d = 0; d < width; ++d) keys_t[d * KEY_TILE + j] = key_rows[j][d];
    const int last = rows - 1;
    for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
        TileScores block[ROW_BLOCK] = {};
        for (int64_t d = 0; d < width; ++d) {
            f32x16 k[KEY_VECTORS];
            for (int kv = 0; kv < KEY_VECTORS; ++kv) k[kv] = load16(keys_t + d * KEY_TILE + kv * LANES);
            for (int b = 0; b < ROW_BLOCK; ++b) {
                // Past the last row, recompute the last one rather than branch in the inner loop.
                const float qd = q[std::min(r0 + b, last) * width + d];
                for (int kv = 0; kv < KEY_VECTORS; ++kv) block[b].v[kv] += qd * k[kv];
            }
        }
        for (int b = 0; b < ROW_BLOCK && r0 + b < rows; ++b) scratch.scores[r0 + b] = block[b];
    }
}

// Fold one row's scores for the tile (its first `visible` keys count) into its running max and sum;
// returns the factor its accumulator must be rescaled by, and the tile's weights in `probs`.
inline float online_softmax(const TileScores& scores, int visible, float& row_max, float& row_sum, float* probs) {
    const int used = (visible + LANES - 1) / LANES;  // score vectors holding visible keys
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const f32x16 zero = {};
    const f32x16 minus_infinity = zero - INFINITY;
    f32x16 s[KEY_VECTORS];
    f32x16 tile_max = minus_infinity;
    for (int kv = 0; kv < used; ++kv) {
        const i32x16 masked = lane + kv * LANES >= visible;
        s[kv] = masked ? minus_infinity : scores.v[kv];
        tile_max = s[kv] > tile_max ? s[kv] : tile_max;
    }
    const float new_max = std::max(row_max, reduce_max(tile_max));
    const float rescale = row_max == new_max ? 1.0f : std::exp(row_max - new_max);  // exp(-inf) = 0 at first
    f32x16 total = zero;
    for (int kv = 0; kv < used; ++kv) {
        const i32x16 masked = lane + kv * LANES >= visible;
        const f32x16 p = exp_nonpositive(s[kv] - new_max);
        const f32x16 kept = masked ? zero : p;
        total += kept;
        store16(probs + kv * LANES, kept);
    }
    row_sum = row_sum * rescale + reduce_sum(total);
    row_max = new_max;
    return rescale;
}

template <typename T>
void attend(const Problem& pb, const WorkItem& item, Scratch& scratch) {
    const int64_t D = pb.head_dim;
    const int64_t width = scratch.width;
    const int nv = int(width / LANES);
    const int64_t group = pb.num_q_heads / pb.num_kv_heads;
    const int64_t token0 = pb.query_start_loc[item.seq];
    const int64_t query_len = pb.query_start_loc[item.seq + 1] - token0;
    const int64_t context = pb.seq_lens[item.seq] - query_len;
    const int32_t* table = pb.block_tables + item.seq * pb.block_table_stride;
    const T* query = static_cast<const T*>(pb.query);
    T* out = static_cast<T*>(pb.out);
    const T* k_cache = static_cast<const T*>(pb.k_cache);
    const T* v_cache = static_cast<const T*>(pb.v_cache);
    const int64_t slot_stride = pb.num_kv_heads * D;
    const int64_t block_stride = pb.block_size * slot_stride;
    // fp32 rows whose head_dim fills whole vectors are read in the pages; others are copied, widened and padded.
    const bool in_place = sizeof(T) == sizeof(float) && D == width;
    const int table_index = nv <= MAX_VECTORS ? nv : 0;
    const Accumulate accumulate = Kernels::accumulate[table_index];
    const AccumulatePair accumulate_pair = Kernels::accumulate_pair[table_index];
    const DotScores dot = DOT_ROWS >= item.num_queries * group ? Kernels::dot[table_index] : nullptr;

    // Each KV head has `rows` rows, position-major (row = i * group + g); head h's start at (h - begin) * rows.
    const int rows = int(item.num_queries * group);
    const int num_heads = item.kv_head_end - item.kv_head_begin;
    float* q = scratch.query.data();
    float* acc = scratch.acc.data();
    float* row_max = scratch.row_max.data();
    float* row_sum = scratch.row_sum.data();
    for (int h = 0; h < num_heads; ++h) {
        for (int r = 0; r < rows; ++r) {
            const int64_t row = int64_t(h) * rows + r;
            const int64_t i = item.first_query + r / group;
            const int64_t head = (item.kv_head_begin + h) * group + r % group;
            const T* src = query + (token0 + i) * pb.query_stride_token + head * pb.query_stride_head;
            for (int64_t d = 0; d < D; ++d) q[row * width + d] = to_float(src[d]) * pb.scale;  // padding stays 0
            std::fill(acc + row * width, acc + (row + 1) * width, 0.0f);
            row_max[row] = -INFINITY;
            row_sum[row] = 0.0f;
        }
    }

    // Row r sees keys [0, context + its position + 1); the last position sees the most.
    const int64_t key_end = context + item.first_query + item.num_queries;
    int64_t slot_offsets[KEY_TILE];
    const float* key_rows[KEY_TILE];
    const float* value_rows[KEY_TILE];
    for (int64_t key0 = 0; key0 < key_end; key0 += KEY_TILE) {
        const int num_keys = int(std::min<int64_t>(KEY_TILE, key_end - key0));
        for (int j = 0; j < num_keys; ++j) {
            const int64_t pos = key0 + j;
            slot_offsets[j] = int64_t(table[pos / pb.block_size]) * block_stride + (pos % pb.block_size) * slot_stride;
        }
        for (int j = num_keys; j < KEY_TILE; ++j) key_rows[j] = scratch.zero_row();
        for (int h = 0; h < num_heads; ++h) {
            const int64_t head_offset = (item.kv_head_begin + h) * D;
            for (int j = 0; j < num_keys; ++j) {
                const int64_t offset = slot_offsets[j] + head_offset;
                if (in_place) {
                    key_rows[j] = reinterpret_cast<const float*>(k_cache + offset);
                    value_rows[j] = reinterpret_cast<const float*>(v_cache + offset);
                } else {
                    float* k = scratch.keys.data() + j * width;
                    float* v = scratch.values.data() + j * width;
                    for (int64_t d = 0; d < D; ++d) k[d] = to_float(k_cache[offset + d]);
                    for (int64_t d = 0; d < D; ++d) v[d] = to_float(v_cache[offset + d]);
                    key_rows[j] = k;
                    value_rows[j] = v;
                }
            }
            const float* head_q = q + int64_t(h) * rows * width;
            if (dot != nullptr)
                dot(head_q, rows, key_rows, (num_keys + LANES - 1) / LANES, scratch.scores.data(), nv);
            else
                transposed_scores(head_q, rows, width, key_rows, scratch);
            alignas(64) float probs[2][KEY_TILE];
            for (int r = 0; r < rows;) {
                const int64_t visible = std::min<int64_t>(num_keys, context + item.first_query + r / group + 1 - key0);
                const int64_t row = int64_t(h) * rows + r;
                const bool pair = r + 1 < rows && (r + 1) / group == r / group;  // the next row: same position
                if (visible <= 0) {  // the tile lies past this row's position (later rows may see it)
                    r += 1;
                    continue;
                }
                const float rescale0 = online_softmax(scratch.scores[r], int(visible), row_max[row], row_sum[row], probs[0]);
                if (pair) {
                    const float rescale1 = online_softmax(scratch.scores[r + 1], int(visible), row_max[row + 1], row_sum[row + 1], probs[1]);
                    accumulate_pair(acc + row * width, acc + (row + 1) * width, rescale0, rescale1, probs[0], probs[1], value_rows,
                                    int(visible), nv);
                    r += 2;
                } else {
                    accumulate(acc + row * width, rescale0, probs[0], value_rows, int(visible), nv);
                    r += 1;
                }
            }
        }
    }

    for (int h = 0; h < num_heads; ++h) {
        for (int r = 0; r < rows; ++r) {
            const int64_t row = int64_t(h) * rows + r;
            const int64_t i = item.first_query + r / group;
            const int64_t head = (item.kv_head_begin + h) * group + r % group;
            T* dst = out + (token0 + i) * pb.out_stride_token + head * pb.out_stride_head;
            const float inv = 1.0f / row_sum[row];  // every row sees at least its own key
            for (int64_t d = 0; d < D; ++d) store(acc[row * width + d] * inv, dst + d);
        }
    }
}

// Items cover all KV heads of a (sequence, query tile) so that pages are read whole, unless that leaves
// too few items to keep every thread busy: then the heads are split between items.
std::vector<WorkItem> work_items(const Problem& pb, int num_threads) {
    const int64_t group = pb.num_q_heads / pb.num_kv_heads;
    const int64_t queries_per_item = std::max<int64_t>(1, MAX_GROUP_ROWS / group);
    int64_t num_tiles = 0;
    for (int64_t seq = 0; seq < pb.num_seqs; ++seq) {
        const int64_t query_len = pb.query_start_loc[seq + 1] - pb.query_start_loc[seq];
        num_tiles += (query_len + queries_per_item - 1) / queries_per_item;
    }
    int64_t head_splits = 1;
    while (num_threads > 1 && num_tiles * head_splits < 4 * num_threads && head_splits < pb.num_kv_heads) ++head_splits;
    std::vector<WorkItem> items;
    items.reserve(num_tiles * head_splits);
    for (int64_t seq = 0; seq < pb.num_seqs; ++seq) {
        const int64_t query_len = pb.query_start_loc[seq + 1] - pb.query_start_loc[seq];
        for (int64_t first = 0; first < query_len; first += queries_per_item) {
            const int64_t count = std::min(queries_per_item, query_len - first);
            for (int64_t split = 0; split < head_splits; ++split) {
                const int64_t begin = pb.num_kv_heads * split / head_splits;
                const int64_t end = pb.num_kv_heads * (split + 1) / head_splits;
                items.push_back({int32_t(seq), int32_t(first), int32_t(count), int32_t(begin), int32_t(end)});
            }
        }
    }
    return items;
}

template <typename T>
void run(const Problem& pb, int num_threads) {
    const std::vector<WorkItem> items = work_items(pb, num_threads);
    const int64_t num_items = int64_t(items.size());
    const int64_t max_rows = pb.num_kv_heads * MAX_GROUP_ROWS;
    const int64_t width = (pb.head_dim + LANES - 1) / LANES * LANES;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_items > 1)
    {
        Scratch scratch(max_rows, width);
        // Prefill tiles late in a long chunk cost more than early ones: hand items out dynamically.
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < num_items; ++n) attend<T>(pb, items[n], scratch);
    }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16 (query, out and both caches alike). Returns 0, or -1 for an
// unknown dtype or a query head count that is not a multiple of the KV head count (or a group too large).
int paged_attention(const void* query, void* out, const void* k_cache, const void* v_cache, const int32_t* block_tables,
                    const int32_t* query_start_loc, const int32_t* seq_lens, int64_t num_seqs, int64_t num_q_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t block_table_stride,
                    int64_t query_stride_token, int64_t query_stride_head, int64_t out_stride_token,
                    int64_t out_stride_head, float scale, int dtype, int num_threads) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || num_q_heads / num_kv_heads > MAX_GROUP_ROWS) return -1;
    const Problem pb{query,           out,      k_cache,     v_cache,      block_tables,       query_start_loc,
                     seq_lens,        num_seqs, num_q_heads, num_kv_heads, head_dim,           block_size,
                     block_table_stride, query_stride_token, query_stride_head, out_stride_token, out_stride_head,
                     scale};
    switch (dtype) {
        case 0: run<float>(pb, num_threads); return 0;
        case 1: run<bf16>(pb, num_threads); return 0;
        case 2: run<_Float16>(pb, num_threads); return 0;
        default: return -1;
    }
}

}  // extern "C"
