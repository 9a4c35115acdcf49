// Which decode sequences of a step share the leading blocks of their block tables, for the cascade pass
// of paged_attention.cpp: the gateway's prefix cache gives every request that starts with the same
// tokens the SAME physical blocks, so "shares a prefix" is "has the same leading table entries", found
// from the tables alone in a few microseconds a call.
//
// The sequences are sorted by their tables (lexicographically, over the entries holding cached keys),
// which puts sequences with a long common prefix next to each other: the prefix common to a run of
// sorted sequences is the smallest common prefix of adjacent pairs in it. A group is the run that saves
// the most key reads, (members - 1) x shared keys: the largest rectangle under the histogram of
// adjacent common prefixes. The runs left on either side are searched again, so two system prompts
// shared by two sets of requests make two groups.

#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

struct SharedGroup {
    std::vector<int32_t> members;  // sequence indices
    int64_t shared_keys;           // positions [0, shared_keys) are the same keys for every member
};

struct TableView {
    const int32_t* block_tables;
    int64_t stride;          // entries per table row
    int64_t block_size;
    const int64_t* context;  // per sequence: cached positions every query of the sequence sees
    const int32_t* row(int32_t seq) const { return block_tables + seq * stride; }
    int64_t cached_blocks(int32_t seq) const { return (context[seq] + block_size - 1) / block_size; }
};

// Positions whose keys two sequences share: equal leading table entries, within both contexts.
inline int64_t common_keys(const TableView& view, int32_t a, int32_t b) {
    const int64_t blocks = std::min(view.cached_blocks(a), view.cached_blocks(b));
    const int32_t* ta = view.row(a);
    const int32_t* tb = view.row(b);
    int64_t equal = 0;
    while (equal < blocks && ta[equal] == tb[equal]) ++equal;
    return std::min({equal * view.block_size, view.context[a], view.context[b]});
}

// The largest rectangle under heights[begin, end): its [first, last) and height (0 when all are 0).
inline std::pair<std::pair<int64_t, int64_t>, int64_t> largest_rectangle(const std::vector<int64_t>& heights, int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, int64_t>> open;  // (start, height), heights increasing
    std::pair<int64_t, int64_t> best_span{begin, begin};
    int64_t best_height = 0, best_area = 0;
    for (int64_t k = begin; k <= end; ++k) {
        const int64_t height = k < end ? heights[k] : 0;
        int64_t start = k;
        while (!open.empty() && open.back().second >= height) {
            const auto [s, h] = open.back();
            open.pop_back();
            if (h * (k - s) > best_area) {
                best_area = h * (k - s);
                best_span = {s, k};
                best_height = h;
            }
            start = s;
        }
        open.emplace_back(start, height);
    }
    return {best_span, best_height};
}

// Groups of at least two candidates sharing at least `min_shared_keys` positions; a candidate is in at
// most one group.
inline std::vector<SharedGroup> shared_prefix_groups(std::vector<int32_t> candidates, const TableView& view, int64_t min_shared_keys) {
    std::vector<SharedGroup> groups;
    if (candidates.size() < 2) return groups;
    std::sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
        const int32_t* ta = view.row(a);
        const int32_t* tb = view.row(b);
        return std::lexicographical_compare(ta, ta + view.cached_blocks(a), tb, tb + view.cached_blocks(b));
    });
    const int64_t n = int64_t(candidates.size());
    // heights[i]: keys shared by sorted candidates i and i + 1; too few to be worth a pass count as none.
    std::vector<int64_t> heights(n - 1);
    for (int64_t i = 0; i + 1 < n; ++i) {
        const int64_t shared = common_keys(view, candidates[i], candidates[i + 1]);
        heights[i] = shared >= min_shared_keys ? shared : 0;
    }
    std::vector<std::pair<int64_t, int64_t>> ranges{{0, n - 1}};  // ranges of `heights` still to search
    while (!ranges.empty()) {
        const auto [begin, end] = ranges.back();
        ranges.pop_back();
        if (begin >= end) continue;
        const auto [span, height] = largest_rectangle(heights, begin, end);
        if (height == 0) continue;
        // heights[first, last) link candidates first .. last.
        const auto [first, last] = span;
        groups.push_back({std::vector<int32_t>(candidates.begin() + first, candidates.begin() + last + 1), height});
        ranges.emplace_back(begin, first - 1);  // candidates begin .. first - 1
        ranges.emplace_back(last + 1, end);     // candidates last + 1 .. end
    }
    return groups;
}
