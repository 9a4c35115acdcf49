"""The KV blocks a set of sequences is expected to hold over the coming steps: the curve that
predictive admission (gateway/admission.py) checks against the pool.

Each sequence grows one token per step until it ends, then frees what it holds. When it ends is
uncertain: by the learned distribution of the used share R of max_tokens (gateway/output_lengths.py),
a sequence that has generated g of at most m tokens is still running after t more steps with
probability alive(t) = P(R > (g + t - lag) / m) / P(R > g / m), where the lag is the steps its
last result takes to come back (the pipeline keeps two steps in flight, and blocks are freed only
when the result that ends a sequence is applied). Its blocks after t steps are the ones it frees
when it ends plus those its growth adds. The curve is, at each step t of a grid,
    mean(t) = sum over sequences of alive(t) * blocks(t), minus the blocks they would free now
    var(t)  = sum of alive(t) * (1 - alive(t)) * blocks(t)^2 (each sequence ends independently)
so mean(t) is the expected change of the pool's held blocks, and its peak over t plus a margin of
standard deviations is what admitting more must leave room for. Not the sum of each sequence's
final size: sequences end at different times and free their blocks for the later growth of others.

Shared blocks are never counted as freed: a block another table also holds (a popular prefix, the
prompt of an n > 1 request) stays held when one holder ends, and new requests keep hitting the
popular ones. Counting a share of them as freed admits too much (the simulator's preemptions fall
from hundreds to one, with exact output lengths, when they are not). Sequences that will exist
soon count too: the children an n > 1 request forks after its prompt, and the sequences of a
recomputed one awaiting their shared prompt.

Cost: numpy over sequences x grid points; the running set's curve is built at most once per
step and each admitted request's curve is added to it (gateway/admission.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from paged.gateway.block_allocator import BlockAllocator, CacheHit
from paged.gateway.output_lengths import OutputLengthModel, used_shares
from paged.gateway.request import Request, Sequence

# Grid points over the horizon. With learned lengths the curve is smooth enough that 200 points
# find its peak as well as one point per step does (measured with the simulator).
DEFAULT_POINTS = 200
# Steps from the step that samples a sequence's last token until its blocks are freed: the step
# pipeline's depth (gateway/step_pipeline.py), since that result is applied two schedules later.
RESULT_LAG_STEPS = 2


@dataclass(slots=True)
class DemandRows:
    """One row per sequence, for the forecast."""

    generated: list[int] = field(default_factory=list)  # output tokens so far (placeholders included)
    max_output: list[int] = field(default_factory=list)  # output tokens it may reach
    tokens: list[int] = field(default_factory=list)  # tokens it holds or will hold KV for
    table_blocks: list[int] = field(default_factory=list)  # blocks already in its table (or shared into it)
    freed: list[int] = field(default_factory=list)  # blocks it frees when it ends (held by no other table)

    def add(self, generated: int, max_output: int, tokens: int, table_blocks: int, freed: int) -> None:
        self.generated.append(generated)
        self.max_output.append(max_output)
        self.tokens.append(tokens)
        self.table_blocks.append(table_blocks)
        self.freed.append(freed)

    def extend(self, other: DemandRows) -> None:
        for name in DemandRows.__slots__:
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.generated)

    def horizon(self) -> int:
        """Steps until the last of them must have ended and freed its blocks."""
        return max((m - g for g, m in zip(self.generated, self.max_output, strict=True)), default=0) + RESULT_LAG_STEPS

    def used_shares(self) -> np.ndarray:
        """Each sequence's used share of its max_tokens so far: censored observations for the model."""
        return used_shares(self.generated, self.max_output)


@dataclass(slots=True)
class DemandCurve:
    """Expected change of held blocks (mean) and its variance at each grid step."""

    grid: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def __add__(self, other: DemandCurve) -> DemandCurve:
        return DemandCurve(self.grid, self.mean + other.mean, self.var + other.var)

    def peak(self, z: float) -> float:
        """The most blocks the set is expected to add at any step, plus z standard deviations."""
        return float((self.mean + z * np.sqrt(self.var)).max())


class DemandForecast:
    def __init__(self, lengths: OutputLengthModel, block_size: int, num_points: int = DEFAULT_POINTS) -> None:
        self.lengths = lengths
        self.block_size = block_size
        self.num_points = num_points
        # Rows x grid arrays reused from curve to curve: fresh ones of a few hundred KiB cost more in
        # page faults than the arithmetic (3x at 256 sequences).
        self._work = np.empty((3, 0, 0))
        self._work_index = np.empty((0, 0), dtype=np.intp)

    def grid(self, horizon: int) -> np.ndarray:
        return np.unique(np.linspace(0, max(horizon, 1), self.num_points).round().astype(np.int64))

    def _workspace(self, num_rows: int, num_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        work = self._work
        if work.shape[1] < num_rows or work.shape[2] != num_points:
            capacity = max(2 * num_rows, 64)
            work = self._work = np.empty((3, capacity, num_points))
            self._work_index = np.empty((capacity, num_points), dtype=np.intp)
        return work[0, :num_rows], work[1, :num_rows], work[2, :num_rows], self._work_index[:num_rows]

    def curve(self, rows: DemandRows, grid: np.ndarray) -> DemandCurve:
        """The set's curve on `grid`. The hot part of predictive admission: numpy over rows x grid
        points in float64 (quotients of integers are exact, so ceilings and table indices are)."""
        num_rows = len(rows)
        if not num_rows:
            zeros = np.zeros(len(grid))
            return DemandCurve(grid, zeros, zeros.copy())
        later, alive, held, index = self._workspace(num_rows, len(grid))
        generated = np.asarray(rows.generated, dtype=np.float64)
        max_output = np.maximum(np.asarray(rows.max_output, dtype=np.float64), 1.0)
        steps = grid.astype(np.float64)
        lagged = steps - RESULT_LAG_STEPS
        np.add(generated[:, None], np.maximum(lagged, 0.0)[None, :], out=later)  # output tokens by then
        # A sequence that runs to its limit still holds its blocks RESULT_LAG_STEPS steps after the
        # step that samples its last token, also when that step is the one being planned (g = m).
        to_limit = (max_output - generated)[:, None]
        lengths = self.lengths
        table = lengths.survival(rows.used_shares() if lengths.needs_refresh() else None)
        if table is None:  # nothing learned yet: every sequence may use all of max_tokens
            np.less(lagged[None, :], to_limit, out=alive)
        else:
            resolution = lengths.resolution
            per_token = resolution / max_output  # table points per output token
            now = table[np.minimum(generated * per_token, resolution).astype(np.intp)]
            np.multiply(later, per_token[:, None], out=alive)
            np.minimum(alive, resolution, out=alive)
            index[...] = alive
            np.take(table, index, out=alive)
            # Past every length seen so far nothing is known: it may run to its limit. At its limit
            # (the step being planned samples its last token) it ends for sure.
            survived = (now > 0) & (generated < max_output)
            alive /= np.where(survived, now, 1.0)[:, None]
            if not survived.all():
                alive[~survived] = lagged[None, :] < to_limit[~survived]
        tokens = np.asarray(rows.tokens, dtype=np.float64)
        freed = np.asarray(rows.freed, dtype=np.float64)
        # KV for every token but the last, which is sampled and never computed.
        most = tokens - generated + max_output - 1.0
        np.add(tokens[:, None], steps[None, :], out=held)
        np.minimum(held, most[:, None], out=held)
        held /= self.block_size
        np.ceil(held, out=held)
        held -= np.asarray(rows.table_blocks, dtype=np.float64)[:, None]
        np.maximum(held, 0.0, out=held)
        held += freed[:, None]
        expected = np.multiply(alive, held, out=later)
        mean = expected.sum(axis=0) - freed.sum()
        var = np.einsum("ij,ij->j", expected, np.subtract(held, expected, out=held))  # sum of alive (1 - alive) held^2
        return DemandCurve(grid, mean, var)


def running_rows(running: list[Sequence], awaiting: list[Request], allocator: BlockAllocator) -> DemandRows:
    """The running batch, the children its unforked n > 1 requests will fork, and the sequences
    awaiting a recomputed shared prompt."""
    rows = DemandRows()
    exclusive = allocator.exclusive_blocks(running)
    tables = allocator.seqs
    for seq, freed in zip(running, exclusive, strict=True):
        request = seq.request
        prompt_len = request.num_prompt_tokens
        record = tables.get(seq.seq_id)
        # A shared partly filled block it will copy before writing is not one it keeps.
        table_blocks = len(record.table) - allocator.will_copy_on_write(seq) if record is not None else 0
        rows.add(seq.num_tokens - prompt_len, seq.max_num_tokens - prompt_len, seq.num_tokens, table_blocks, freed)
        if seq.index == 0 and not request.forked:
            _add_children(rows, request, seq, allocator)
    for request in awaiting:
        prompt_len = request.num_prompt_tokens
        shared = allocator.shared_prompt_blocks(prompt_len)
        for seq in request.awaiting_shared_prompt:
            rows.add(seq.num_tokens - prompt_len, seq.max_num_tokens - prompt_len, seq.num_tokens, shared, 0)
    return rows


def request_rows(
    request: Request,
    seqs: list[Sequence],
    hits: list[CacheHit],
    awaiting: list[Sequence],
    allocator: BlockAllocator,
    taken: Mapping[int, int],
) -> DemandRows:
    """A waiting request about to be admitted: `seqs` take blocks now, `awaiting` will share its
    recomputed prompt, and an unforked n > 1 request will fork its children. A prefix hit on a block
    two or more tables held when the running rows were built costs nothing (no end frees it); one on
    a block a single running sequence held then costs the block, since that sequence's row counts it
    as freed at its end; one on a cached-free block costs it too. `taken`: the references on hit
    blocks that requests admitted since the running rows were built took (by block), whose rows
    count those blocks as their own and so free them at their ends."""
    rows = DemandRows()
    prompt_len = request.num_prompt_tokens
    for seq, hit in zip(seqs, hits, strict=True):
        kept_anyway = allocator.num_shared(hit.blocks, taken)
        rows.add(seq.num_tokens - prompt_len, seq.max_num_tokens - prompt_len, seq.num_tokens, kept_anyway, 0)
    shared = allocator.shared_prompt_blocks(prompt_len)
    for seq in awaiting:
        rows.add(seq.num_tokens - prompt_len, seq.max_num_tokens - prompt_len, seq.num_tokens, shared, 0)
    if not request.forked:
        _add_children(rows, request, seqs[0], allocator)
    return rows


def swapped_rows(request: Request, seqs: list[Sequence], allocator: BlockAllocator) -> DemandRows:
    """A swapped request about to come back: every block it holds is new to the pool, the full prompt
    blocks its sequences share (an n > 1 request) counted once, with the first."""
    rows = DemandRows()
    prompt_len = request.num_prompt_tokens
    shared = allocator.shared_prompt_blocks(prompt_len)
    for index, seq in enumerate(seqs):
        rows.add(seq.num_tokens - prompt_len, seq.max_num_tokens - prompt_len, seq.num_tokens, shared if index else 0, 0)
    return rows


def _add_children(rows: DemandRows, request: Request, parent: Sequence, allocator: BlockAllocator) -> None:
    """The n - 1 children of an unforked request: each shares the full prompt blocks and adds its own."""
    prompt_len = request.num_prompt_tokens
    shared = allocator.shared_prompt_blocks(prompt_len)
    for child in request.seqs[1:]:
        rows.add(0, child.max_num_tokens - prompt_len, max(parent.num_tokens, prompt_len + 1), shared, 0)
