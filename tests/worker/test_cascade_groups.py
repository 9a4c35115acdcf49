"""The shared-prefix (cascade) pass of the native CPU attention kernel forms its groups in the real
model path: a CPU worker's steps whose decode rows share leading blocks (prefix-cache hits of
requests with one system prompt, the children of an n > 1 request) hand the kernel metadata on which
it groups those rows.

Falling back to the per-sequence pass keeps the outputs exact (only slower), so no output test would
notice; these assert the groups instead: of the metadata each layer passed to the kernel, as the
kernel's own plan forms them (cpu_ops.shared_prefix_groups). The kernel's grouping on hand-made
metadata is tested in test_attention_cpu.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from paged.shared.config import CacheConfig, MiB, ModelConfig
from paged.shared.protocol import NewSequence, ScheduledSeq, StepInput
from paged.worker.attention import cpu_ops
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.native.compiler import NativeBuildError
from paged.worker.worker import Worker
from support.worker_steps import GREEDY, BlockAllocator, SeqPlan, run_plans

try:
    cpu_ops.load()
except NativeBuildError as exc:  # pragma: no cover - machines with a compiler run these tests
    pytest.skip(f"the native kernel cannot be built here: {exc}", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread")

BS = 16


@dataclass
class KernelCall:
    meta: AttentionMetadata
    num_q_heads: int
    k_cache: torch.Tensor


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[KernelCall]:
    """Each forward pass's attention metadata, as the native kernel received it (once per pass: every
    layer gets the same metadata)."""
    calls: list[KernelCall] = []
    attend = cpu_ops.paged_attention

    def recording(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not calls or calls[-1].meta is not meta:
            calls.append(KernelCall(meta, query.shape[1], k_cache))
        return attend(query, k_cache, v_cache, meta, scale)

    monkeypatch.setattr(cpu_ops, "paged_attention", recording)
    return calls


def native_worker() -> Worker:
    """The builtin model (GQA 8/4) on the native CPU backend: what a CPU worker runs."""
    worker = Worker(
        ModelConfig(model=None, device="cpu", attention_backend="cpu"),
        CacheConfig(block_size=BS, kv_cache_memory=8 * MiB, swap_space=0),
        max_num_batched_tokens=512,
    )
    assert worker.model.model.layers[0].self_attn.ops is cpu_ops  # type: ignore[union-attr]
    return worker


def groups(call: KernelCall) -> tuple[list[int], list[int]]:
    return cpu_ops.shared_prefix_groups(call.meta, call.num_q_heads, call.k_cache)


def test_decode_rows_of_requests_sharing_a_system_prompt_form_one_group(kernel_calls: list[KernelCall]) -> None:
    """Three requests start with one three-block system prompt: the first computes it, the other two
    take its blocks as prefix-cache hits, as the gateway hands them out. A fourth shares nothing."""
    worker = native_worker()
    allocator = BlockAllocator(worker.num_blocks)
    system = [1, *range(10, 10 + 3 * BS - 1)]
    prompts = {0: system + [200, 201], 1: system + [210, 211, 212], 2: system + [220], 3: [1, *range(100, 140)]}
    tables = {0: allocator.allocate(4), 3: allocator.allocate(3)}
    tables[1] = tables[0][:3] + allocator.allocate(1)
    tables[2] = tables[0][:3] + allocator.allocate(1)
    first = [
        ScheduledSeq(0, 0, len(prompts[0]), 0, tables[0]),
        ScheduledSeq(3, 0, len(prompts[3]), 0, tables[3]),
    ]
    worker.execute_step(StepInput(0, scheduled=first, new_seqs=[NewSequence(s, prompts[s], GREEDY) for s in (0, 3)]))
    hits = [ScheduledSeq(s, 3 * BS, len(prompts[s]) - 3 * BS, 0, tables[s]) for s in (1, 2)]
    worker.execute_step(StepInput(1, scheduled=hits, new_seqs=[NewSequence(s, prompts[s], GREEDY) for s in (1, 2)]))
    decodes = [ScheduledSeq(s, len(prompts[s]), 1, len(tables[s]), []) for s in (0, 1, 2, 3)]
    output = worker.execute_step(StepInput(2, scheduled=decodes))
    assert not output.errors and len(output.results) == 4
    group_of, shared_keys = groups(kernel_calls[-1])
    assert group_of[0] != -1 and group_of[:3] == [group_of[0]] * 3 and group_of[3] == -1
    assert shared_keys == [3 * BS] * 3 + [0]


def test_decode_rows_of_forked_sequences_form_one_group(kernel_calls: list[KernelCall]) -> None:
    """An n = 3 request: the children share the parent's prompt blocks (the partial last one is copied
    when first written), so their decode rows attend the two full blocks together."""
    worker = native_worker()
    prompt = [1, *range(20, 20 + 2 * BS + 4)]
    runs = run_plans(worker, [SeqPlan(0, prompt, num_decode=3, fork_ids=[1, 2])], BlockAllocator(worker.num_blocks))
    assert all(len(run.tokens) == 4 for run in runs.values())
    decode_steps = [call for call in kernel_calls if len(call.meta.seq_lens) == 3]
    assert decode_steps
    for call in decode_steps:
        group_of, shared_keys = groups(call)
        assert group_of == [group_of[0]] * 3 and group_of[0] != -1
        assert shared_keys == [2 * BS] * 3
