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
// A work item is a set of rows (every (query position, query head) pair of some query positions, grouped
// by the KV head they share: GQA) attending a range of keys read through one block table. Keys are taken
// KEY_TILE positions at a time whatever the page size (block_size 1 runs at full tile width), and for
// each key tile the item's KV heads are visited in order, so a slot's heads, adjacent in the page, are
// read front to back. Softmax is online, in fp32 (attention_tiles.h has the tile math).
//
// Two passes (cascade attention, as FlashInfer and SGLang do on GPUs):
//   1. Shared prefix: decode rows of sequences whose tables start with the same blocks (the gateway's
//      prefix cache hands out the same blocks for the same leading tokens; shared_prefix.h finds them)
//      attend those keys together, every member's rows in one item, so a shared page is read once per
//      step and its scores are a small matrix product instead of one dot product per row and key. The
//      items leave their running max, sum and unnormalized output per row in a state buffer.
//   2. Per sequence: each (sequence, query tile) attends the keys after its shared prefix, from the
//      state pass 1 left (or from scratch), and writes the normalized output. Prefill chunks run here:
//      their rows are many, so their scores take the transposed path too.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_tiles.h"
#include "shared_prefix.h"
#include "vector_math.h"

namespace {

constexpr int MAX_ITEM_ROWS = 128;      // rows (positions x query heads) per KV head in a work item
constexpr int DOT_ROWS = 8;             // at most this many rows per KV head: the dot-product path
constexpr int64_t MIN_SHARED_KEYS = 16; // a shared prefix shorter than this is left to the per-sequence pass

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

    int64_t group() const { return num_q_heads / num_kv_heads; }
    int64_t query_len(int64_t seq) const { return query_start_loc[seq + 1] - query_start_loc[seq]; }
    int64_t context(int64_t seq) const { return seq_lens[seq] - query_len(seq); }
};

// Query positions first_query .. first_query + num_queries - 1 of a sequence's new tokens.
struct Span {
    int32_t seq;
    int32_t first_query;
    int32_t num_queries;
};

struct WorkItem {
    int32_t span_begin, span_end;  // its spans in Plan::spans
    int32_t table_seq;             // whose block table the keys are read through
    int32_t kv_head_begin, kv_head_end;
    int64_t key_begin, key_end;
    bool shared_pass;  // pass 1: leave the partial state; pass 2: start from it (if any), write the output
};

// The running softmax of the rows that take part in pass 1, handed to pass 2: per (state row, query
// head), the max, the sum and `width` unnormalized output floats. A sequence's state rows are its tokens.
struct PartialState {
    std::vector<int64_t> first_row;  // per sequence: its first token's state row, or -1 (no shared pass)
    std::vector<float> max, sum, acc;
};

struct Plan {
    std::vector<Span> spans;
    std::vector<WorkItem> shared_items, items;
    PartialState state;
};

// Per-thread scratch, sized for the largest work item. Row widths are the padded head_dim.
struct Scratch {
    std::vector<float> query;        // [heads][rows][width], pre-scaled
    std::vector<float> acc;          // [heads][rows][width]
    std::vector<float> row_max;      // [heads][rows]
    std::vector<float> row_sum;      // [heads][rows]
    std::vector<TileScores> scores;  // [rows]: one KV head's rows against the current key tile
    std::vector<float> rescale;      // [rows]
    std::vector<int64_t> row_token;  // [rows]: the token of each row (its query head: the row's place in its group)
    std::vector<int64_t> row_limit;  // [rows]: keys before this position are visible to the row
    std::vector<int64_t> row_state;  // [rows]: its state row, or -1
    std::vector<float> keys_t;       // [width][KEY_TILE], the transposed path only
    std::vector<float> keys;         // [KEY_TILE + 1][width]: keys copied/converted when they must be, then zeros
    std::vector<float> values;       // [KEY_TILE][width]
    int64_t width;
    Scratch(int64_t max_rows, int64_t num_heads, int64_t width)
        : query(num_heads * max_rows * width, 0.0f),
          acc(num_heads * max_rows * width),
          row_max(num_heads * max_rows),
          row_sum(num_heads * max_rows),
          scores(max_rows),
          rescale(max_rows),
          row_token(max_rows),
          row_limit(max_rows),
          row_state(max_rows),
          keys_t(width * KEY_TILE),
          keys((KEY_TILE + 1) * width, 0.0f),
          values(KEY_TILE * width, 0.0f),
          width(width) {}
    const float* zero_row() const { return keys.data() + KEY_TILE * width; }
};

template <typename T>
void attend(const Problem& pb, const Plan& plan, const WorkItem& item, PartialState& state, Scratch& scratch) {
    const int64_t D = pb.head_dim;
    const int64_t width = scratch.width;
    const int nv = int(width / LANES);
    const int64_t group = pb.group();
    const int32_t* table = pb.block_tables + item.table_seq * pb.block_table_stride;
    const T* query = static_cast<const T*>(pb.query);
    T* out = static_cast<T*>(pb.out);
    const T* k_cache = static_cast<const T*>(pb.k_cache);
    const T* v_cache = static_cast<const T*>(pb.v_cache);
    const int64_t slot_stride = pb.num_kv_heads * D;
    const int64_t block_stride = pb.block_size * slot_stride;
    // fp32 rows whose head_dim fills whole vectors are read in the pages; others are copied, widened and padded.
    const bool in_place = sizeof(T) == sizeof(float) && D == width;
    const int table_index = nv <= MAX_VECTORS ? nv : 0;
    const AccumulateRows accumulate = Kernels::accumulate[table_index];

    // The rows of one KV head, span by span, position-major within a span (row = i * group + g); the
    // same for every head, whose rows start at (h - begin) * rows in the per-head arrays.
    int rows = 0;
    for (int32_t s = item.span_begin; s < item.span_end; ++s) {
        const Span& span = plan.spans[s];
        const int64_t token0 = pb.query_start_loc[span.seq] + span.first_query;
        const int64_t position0 = pb.context(span.seq) + span.first_query;
        const int64_t state0 = state.first_row.empty() ? -1 : state.first_row[span.seq];
        for (int64_t i = 0; i < span.num_queries; ++i) {
            for (int64_t g = 0; g < group; ++g, ++rows) {
                scratch.row_token[rows] = token0 + i;
                scratch.row_limit[rows] = position0 + i + 1;
                scratch.row_state[rows] = state0 < 0 ? -1 : (state0 + span.first_query + i) * pb.num_q_heads;
            }
        }
    }
    const DotScores dot = rows <= DOT_ROWS ? Kernels::dot[table_index] : nullptr;
    const int num_heads = item.kv_head_end - item.kv_head_begin;
    float* q = scratch.query.data();
    float* acc = scratch.acc.data();
    float* row_max = scratch.row_max.data();
    float* row_sum = scratch.row_sum.data();
    for (int h = 0; h < num_heads; ++h) {
        for (int r = 0; r < rows; ++r) {
            const int64_t row = int64_t(h) * rows + r;
            const int64_t head = (item.kv_head_begin + h) * group + r % group;
            const T* src = query + scratch.row_token[r] * pb.query_stride_token + head * pb.query_stride_head;
            for (int64_t d = 0; d < D; ++d) q[row * width + d] = to_float(src[d]) * pb.scale;  // padding stays 0
            const int64_t carried = item.shared_pass ? -1 : scratch.row_state[r];
            if (carried >= 0) {  // pass 1 attended this row's shared prefix
                const int64_t at = carried + head;
                std::memcpy(acc + row * width, state.acc.data() + at * width, width * sizeof(float));
                row_max[row] = state.max[at];
                row_sum[row] = state.sum[at];
            } else {
                std::fill(acc + row * width, acc + (row + 1) * width, 0.0f);
                row_max[row] = -INFINITY;
                row_sum[row] = 0.0f;
            }
        }
    }

    int64_t slot_offsets[KEY_TILE];
    const float* key_rows[KEY_TILE];
    const float* value_rows[KEY_TILE];
    TileScores* scores = scratch.scores.data();
    float* rescale = scratch.rescale.data();
    for (int64_t key0 = item.key_begin; key0 < item.key_end; key0 += KEY_TILE) {
        const int num_keys = int(std::min<int64_t>(KEY_TILE, item.key_end - key0));
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
            const int64_t first_row = int64_t(h) * rows;
            const float* head_q = q + first_row * width;
            if (dot != nullptr) {
                dot(head_q, rows, key_rows, (num_keys + LANES - 1) / LANES, scores, nv);
            } else {
                transpose_keys(key_rows, width, scratch.keys_t.data());
                transposed_scores(head_q, rows, width, scratch.keys_t.data(), scores);
                if (in_place) {
                    // Every block of rows reads the tile's values again: pack them first. In the pages a
                    // head's rows lie a slot apart (Hkv * D floats, 1 KiB at 4 x 64), so a tile's rows fall
                    // in a few L1 sets and evict each other; packed, they stay in L1.
                    for (int j = 0; j < num_keys; ++j)
                        std::memcpy(scratch.values.data() + j * width, value_rows[j], width * sizeof(float));
                    for (int j = 0; j < num_keys; ++j) value_rows[j] = scratch.values.data() + j * width;
                }
            }
            for (int r = 0; r < rows; ++r) {
                const int64_t visible = std::min<int64_t>(num_keys, scratch.row_limit[r] - key0);
                if (visible > 0) {
                    rescale[r] = online_softmax(scores[r], int(visible), row_max[first_row + r], row_sum[first_row + r]);
                } else {  // the tile lies past this row's position (later rows of a prefill chunk see it)
                    scores[r] = TileScores{};
                    rescale[r] = 1.0f;
                }
            }
            accumulate(acc + first_row * width, rescale, scores, value_rows, num_keys, rows, nv);
        }
    }

    for (int h = 0; h < num_heads; ++h) {
        for (int r = 0; r < rows; ++r) {
            const int64_t row = int64_t(h) * rows + r;
            const int64_t head = (item.kv_head_begin + h) * group + r % group;
            if (item.shared_pass) {
                const int64_t at = scratch.row_state[r] + head;
                std::memcpy(state.acc.data() + at * width, acc + row * width, width * sizeof(float));
                state.max[at] = row_max[row];
                state.sum[at] = row_sum[row];
                continue;
            }
            T* dst = out + scratch.row_token[r] * pb.out_stride_token + head * pb.out_stride_head;
            const float inv = 1.0f / row_sum[row];  // every row sees at least its own key
            for (int64_t d = 0; d < D; ++d) store(acc[row * width + d] * inv, dst + d);
        }
    }
}

// Copies of `items` covering the KV heads in `splits` parts (one part: the items themselves).
std::vector<WorkItem> split_heads(const std::vector<WorkItem>& items, int64_t splits, int64_t num_kv_heads) {
    std::vector<WorkItem> split;
    split.reserve(items.size() * splits);
    for (const WorkItem& item : items) {
        for (int64_t part = 0; part < splits; ++part) {
            WorkItem copy = item;
            copy.kv_head_begin = int32_t(num_kv_heads * part / splits);
            copy.kv_head_end = int32_t(num_kv_heads * (part + 1) / splits);
            split.push_back(copy);
        }
    }
    return split;
}

// Items cover all KV heads so that pages are read whole, unless that leaves too few items to keep every
// thread busy: then the heads are split between items.
std::vector<WorkItem> spread(const std::vector<WorkItem>& items, int64_t num_kv_heads, int num_threads) {
    int64_t splits = 1;
    while (num_threads > 1 && int64_t(items.size()) * splits < 4 * num_threads && splits < num_kv_heads) ++splits;
    return split_heads(items, splits, num_kv_heads);
}

// Pass 1's groups: decode rows (few per KV head) of sequences that share leading blocks.
std::vector<SharedGroup> find_groups(const Problem& pb) {
    std::vector<int64_t> context(pb.num_seqs);
    std::vector<int32_t> candidates;
    for (int64_t seq = 0; seq < pb.num_seqs; ++seq) {
        context[seq] = pb.context(seq);
        const int64_t query_len = pb.query_len(seq);
        if (query_len > 0 && query_len * pb.group() <= DOT_ROWS && context[seq] >= MIN_SHARED_KEYS) candidates.push_back(int32_t(seq));
    }
    const TableView view{pb.block_tables, pb.block_table_stride, pb.block_size, context.data()};
    return shared_prefix_groups(std::move(candidates), view, MIN_SHARED_KEYS);
}

Plan make_plan(const Problem& pb, int num_threads) {
    Plan plan;
    const int64_t group = pb.group();
    const int32_t all_heads = int32_t(pb.num_kv_heads);

    // Pass 1: each group's rows, in items of at most MAX_ITEM_ROWS rows per KV head.
    const std::vector<SharedGroup> groups = find_groups(pb);
    std::vector<int64_t> shared_keys(pb.num_seqs, 0);
    std::vector<WorkItem> shared_items;
    int64_t state_rows = 0;
    if (!groups.empty()) plan.state.first_row.assign(pb.num_seqs, -1);
    for (const SharedGroup& shared : groups) {
        WorkItem item{int32_t(plan.spans.size()), int32_t(plan.spans.size()), shared.members.front(), 0, all_heads, 0, shared.shared_keys, true};
        int64_t item_rows = 0;
        for (const int32_t seq : shared.members) {
            const int64_t query_len = pb.query_len(seq);
            if (item_rows + query_len * group > MAX_ITEM_ROWS) {
                shared_items.push_back(item);
                item.span_begin = item.span_end;
                item_rows = 0;
            }
            plan.spans.push_back({seq, 0, int32_t(query_len)});
            item.span_end += 1;
            item_rows += query_len * group;
            shared_keys[seq] = shared.shared_keys;
            plan.state.first_row[seq] = state_rows;
            state_rows += query_len;
        }
        shared_items.push_back(item);
    }
    const int64_t width = (pb.head_dim + LANES - 1) / LANES * LANES;
    plan.state.max.resize(state_rows * pb.num_q_heads);
    plan.state.sum.resize(state_rows * pb.num_q_heads);
    plan.state.acc.resize(state_rows * pb.num_q_heads * width);

    // Pass 2: every sequence's query tiles, over the keys after its shared prefix.
    const int64_t queries_per_item = std::max<int64_t>(1, MAX_ITEM_ROWS / group);
    std::vector<WorkItem> items;
    for (int64_t seq = 0; seq < pb.num_seqs; ++seq) {
        const int64_t query_len = pb.query_len(seq);
        for (int64_t first = 0; first < query_len; first += queries_per_item) {
            const int64_t count = std::min(queries_per_item, query_len - first);
            const int32_t span = int32_t(plan.spans.size());
            plan.spans.push_back({int32_t(seq), int32_t(first), int32_t(count)});
            items.push_back({span, span + 1, int32_t(seq), 0, all_heads, shared_keys[seq], pb.context(seq) + first + count, false});
        }
    }
    plan.shared_items = spread(shared_items, pb.num_kv_heads, num_threads);
    plan.items = spread(items, pb.num_kv_heads, num_threads);
    return plan;
}

template <typename T>
void run(const Problem& pb, int num_threads) {
    Plan plan = make_plan(pb, num_threads);
    const int64_t num_shared = int64_t(plan.shared_items.size());
    const int64_t num_items = int64_t(plan.items.size());
    const int64_t width = (pb.head_dim + LANES - 1) / LANES * LANES;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && num_items > 1)
    {
        Scratch scratch(MAX_ITEM_ROWS, pb.num_kv_heads, width);
        // Items differ in cost (prefill tiles late in a long chunk, long contexts): hand them out dynamically.
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < num_shared; ++n) attend<T>(pb, plan, plan.shared_items[n], plan.state, scratch);
        // (the implicit barrier: pass 2 starts from the states pass 1 left)
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < num_items; ++n) attend<T>(pb, plan, plan.items[n], plan.state, scratch);
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
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || num_q_heads / num_kv_heads > MAX_ITEM_ROWS) return -1;
    if (dtype < 0 || dtype > 2) return -1;
    const Problem pb{query,           out,      k_cache,     v_cache,      block_tables,       query_start_loc,
                     seq_lens,        num_seqs, num_q_heads, num_kv_heads, head_dim,           block_size,
                     block_table_stride, query_stride_token, query_stride_head, out_stride_token, out_stride_head,
                     scale};
    switch (dtype) {
        case 0: run<float>(pb, num_threads); break;
        case 1: run<bf16>(pb, num_threads); break;
        default: run<_Float16>(pb, num_threads); break;
    }
    return 0;
}

// The groups paged_attention's shared-prefix pass forms for these tables (for tests and benchmarks):
// group_of[b] is the index of sequence b's group or -1, shared_keys[b] the keys the group shares (or 0).
// Read from the pass-1 items of the kernel's own plan, so a plan that stops grouping shows here.
int paged_attention_shared_groups(const int32_t* block_tables, const int32_t* query_start_loc, const int32_t* seq_lens,
                                  int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads, int64_t block_size,
                                  int64_t block_table_stride, int32_t* group_of, int64_t* shared_keys) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) return -1;
    Problem pb{};
    pb.block_tables = block_tables;
    pb.query_start_loc = query_start_loc;
    pb.seq_lens = seq_lens;
    pb.num_seqs = num_seqs;
    pb.num_q_heads = num_q_heads;
    pb.num_kv_heads = num_kv_heads;
    pb.block_size = block_size;
    pb.block_table_stride = block_table_stride;
    std::fill(group_of, group_of + num_seqs, -1);
    std::fill(shared_keys, shared_keys + num_seqs, 0);
    const Plan plan = make_plan(pb, 1);
    // A group's items read the shared keys through its first member's table: that member names it.
    std::vector<int32_t> index_of(num_seqs, -1);
    int32_t num_groups = 0;
    for (const WorkItem& item : plan.shared_items) {
        int32_t& index = index_of[item.table_seq];
        if (index < 0) index = num_groups++;
        for (int32_t span = item.span_begin; span < item.span_end; ++span) {
            group_of[plan.spans[span].seq] = index;
            shared_keys[plan.spans[span].seq] = item.key_end;
        }
    }
    return 0;
}

}  // extern "C"
