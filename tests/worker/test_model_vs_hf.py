"""Our paged decoder's logits against Hugging Face transformers (eager attention, float32).

Tolerance: max abs difference 1e-4 on float32 logits (observed differences are ~1e-6; the bound leaves
room for summation-order differences, while a wrong RoPE, norm, bias or mask moves logits by far more).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from support.batch_metadata import batch_metadata
from paged.worker.attention.backend import AttentionBackendName
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.model_loader import LoadedModel, load_model

ATOL = 1e-4
BLOCK_SIZE = 16


def prefill_metadata(num_tokens: int, block_size: int) -> AttentionMetadata:
    """One sequence, nothing cached yet, all of its tokens new, on blocks 0, 1, 2, ..."""
    num_blocks = math.ceil(num_tokens / block_size)
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None, :],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )


def paged_logits(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    arch = loaded.arch
    num_tokens = input_ids.shape[0]
    num_blocks = math.ceil(num_tokens / BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=loaded.dtype), torch.zeros(shape, dtype=loaded.dtype)) for _ in range(arch.num_layers)]
    with torch.inference_mode():
        hidden = loaded.model(input_ids, torch.arange(num_tokens), kv_caches, prefill_metadata(num_tokens, BLOCK_SIZE))
        return loaded.model.compute_logits(hidden)


def hf_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        return model(input_ids[None]).logits[0].float()


@pytest.fixture(scope="module", params=["cpu", "torch"])
def attention_backend(request: pytest.FixtureRequest) -> AttentionBackendName:
    """Every comparison runs on the native CPU kernel (what a CPU worker uses) and on the torch reference path."""
    return request.param


@pytest.fixture(scope="module")
def stories_model(stories_dir: Path, attention_backend: AttentionBackendName) -> LoadedModel:
    return load_model(stories_dir, dtype="float32", attention_backend=attention_backend)


@pytest.fixture(scope="module")
def stories_hf_logits(stories_dir: Path) -> Callable[[list[int]], torch.Tensor]:
    """HF logits of a stories260K prompt, one model load and one forward per distinct prompt."""
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32, attn_implementation="eager")

    @functools.cache
    def logits(prompt: tuple[int, ...]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([prompt])).logits[0].float()

    return lambda prompt: logits(tuple(prompt))


def test_stories260k_matches_transformers(stories_model: LoadedModel, stories_hf_logits: Callable) -> None:
    prompt = [1, 403, 407, 261, 378, *range(10, 200, 3)]
    ours = paged_logits(stories_model, torch.tensor(prompt))
    reference = stories_hf_logits(prompt)
    assert ours.shape == reference.shape == (len(prompt), 512)
    assert (ours - reference).abs().max().item() < ATOL
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, initializer_range=0.1, max_position_embeddings=256)

# Each config exercises something the others do not; see the ids.
TINY_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama_gqa_untied_llama3_rope": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            # A small original context so that the scaled, unscaled and blended frequency bands all occur.
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama_mqa_tied_linear_rope_biases": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        ),
    ),
    "mistral_explicit_head_dim": (
        transformers.MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=None, tie_word_embeddings=False),
    ),
    "qwen2_qkv_bias_tied": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False),
    ),
    "qwen3_qk_norm_explicit_head_dim": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, use_sliding_window=False),
    ),
}


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_random_config_matches_transformers(name: str, tmp_path: Path, attention_backend: AttentionBackendName) -> None:
    config_class, overrides = TINY_CONFIGS[name]
    config = config_class(**COMMON, **overrides)
    torch.manual_seed(1234)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF zero-initializes biases and sets norms to one; make them matter
        for param_name, param in hf_model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    hf_model.save_pretrained(tmp_path)
    input_ids = torch.randint(0, COMMON["vocab_size"], (70,), generator=torch.Generator().manual_seed(7))

    loaded = load_model(tmp_path, dtype="float32", attention_backend=attention_backend)
    ours = paged_logits(loaded, input_ids)
    reference = hf_logits(tmp_path, input_ids)
    assert loaded.arch.architecture == config_class.__name__.replace("Config", "ForCausalLM")
    assert (ours - reference).abs().max().item() < ATOL


def run_in_steps(
    loaded: LoadedModel, prompts: list[list[int]], chunk_sizes: list[int], block_size: int, seed: int
) -> list[torch.Tensor]:
    """Prefill several prompts together, each in chunks of its own size, on shuffled physical blocks;
    return every prompt's logits at every position."""
    arch = loaded.arch
    tables = []
    num_blocks = sum(math.ceil(len(p) / block_size) for p in prompts) + 2
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    start = 0
    for prompt in prompts:
        count = math.ceil(len(prompt) / block_size)
        tables.append(order[start : start + count])
        start += count
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(arch.num_layers)]
    done = [0] * len(prompts)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(d < len(p) for d, p in zip(done, prompts)):
        active = [b for b, p in enumerate(prompts) if done[b] < len(p)]
        ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for b in active:
            new = range(done[b], min(done[b] + chunk_sizes[b], len(prompts[b])))
            pos = torch.tensor(list(new))
            ids += [prompts[b][i] for i in new]
            positions.append(pos)
            slots.append(tables[b][pos // block_size] * block_size + pos % block_size)
            query_lens.append(len(new))
            seq_lens.append(new.stop)
        max_blocks = max(len(tables[b]) for b in active)
        block_tables = torch.zeros(len(active), max_blocks, dtype=torch.int32)
        for row, b in enumerate(active):
            block_tables[row, : len(tables[b])] = tables[b]
        meta = batch_metadata(torch.cat(slots), query_lens, seq_lens, block_tables)
        with torch.inference_mode():
            step_logits = loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.cat(positions), kv_caches, meta))
        for b, part in zip(active, step_logits.split(query_lens)):
            logits[b].append(part)
            done[b] += part.shape[0]
    return [torch.cat(parts) for parts in logits]


# Every chunk size (1, 7, 16) and every block size (1, 16, 32) occurs, without the slow full product.
@pytest.mark.parametrize(("chunk", "block_size"), [(1, 16), (7, 1), (7, 32), (16, 16), (16, 1)])
def test_chunked_batched_shuffled_prefill_matches_transformers(
    stories_model: LoadedModel, stories_hf_logits: Callable, chunk: int, block_size: int
) -> None:
    """Chunked prefill, a batch of ragged sequences, shuffled block tables: each row still equals HF's."""
    prompts = [[1, *range(100, 133)], [1, *range(300, 322)], [1, 403, 407, 261, 378]]
    ours = run_in_steps(stories_model, prompts, chunk_sizes=[chunk, 5, 64], block_size=block_size, seed=chunk * 100 + block_size)
    for prompt, logits in zip(prompts, ours):
        reference = stories_hf_logits(prompt)
        assert (logits - reference).abs().max().item() < ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_error_no_worse_than_transformers(
    stories_dir: Path, stories_hf_logits: Callable, dtype: str, attention_backend: AttentionBackendName
) -> None:
    """In bf16/fp16 exact agreement is not expected; our distance from float32 logits must stay within
    2x of transformers' own distance in the same dtype. Both distances are rounding noise carried
    through the layers, and they move with the host's fp16/bf16 matmuls: on one host bf16 0.21 vs 0.23
    and fp16 0.027 vs 0.035; on an AMD EPYC (Zen 4) native kernels bf16 0.17, torch path 0.21 vs
    transformers' 0.23, fp16 0.041 and 0.029 vs 0.027 (×1.51), although the native kernel's fp16
    attention is the correctly rounded result where torch's is not (test_attention_cpu.py). A real
    precision bug (a softmax or an accumulation in the low precision) costs far more than 2x."""
    prompt = [1, 403, 407, 261, 378, *range(10, 200, 3)]
    exact = stories_hf_logits(prompt)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=getattr(torch, dtype), attn_implementation="eager")
    with torch.inference_mode():
        hf_error = (hf_model(torch.tensor([prompt])).logits[0].float() - exact).abs().max().item()
    ours = paged_logits(load_model(stories_dir, dtype=dtype, attention_backend=attention_backend), torch.tensor(prompt))
    assert ours.dtype == torch.float32
    assert (ours - exact).abs().max().item() <= 2.0 * hf_error
