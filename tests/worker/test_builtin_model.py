"""The built-in model: deterministic weights from the seed, usable with the built-in tokenizer."""

from __future__ import annotations

import pytest
import torch

from paged.shared.tokenizer import load_tokenizer
from paged.worker.attention.backend import AttentionBackendName
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.model_loader import load_model


def first_token_logits(seed: int, dtype: str = "auto", attention_backend: AttentionBackendName = "torch") -> torch.Tensor:
    loaded = load_model(None, dtype=dtype, attention_backend=attention_backend, seed=seed)
    ids = torch.tensor(load_tokenizer(None).encode("hello"))
    arch = loaded.arch
    shape = (1, 16, arch.num_kv_heads, arch.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=loaded.dtype), torch.zeros(shape, dtype=loaded.dtype)) for _ in range(arch.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(len(ids)),
        query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32),
        seq_lens=torch.tensor([len(ids)], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=len(ids),
        max_seq_len=len(ids),
    )
    with torch.inference_mode():
        return loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), kv_caches, meta)[-1:])


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    assert torch.equal(first_token_logits(0), first_token_logits(0))
    assert not torch.equal(first_token_logits(0), first_token_logits(1))


def test_builtin_model_shapes() -> None:
    loaded = load_model(None)
    assert loaded.model_dir is None and loaded.dtype == torch.float32
    assert first_token_logits(0).shape == (1, loaded.arch.vocab_size)
    assert loaded.arch.max_model_len == 2048
    assert load_model(None, dtype="bfloat16").model.model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_builtin_model_on_the_native_backend(dtype: str) -> None:
    """Casting the model casts its weights, not the rotary tables: they stay float32, which the fused
    rotary of the native CPU backend reads (a bf16 table made every forward pass raise there)."""
    loaded = load_model(None, dtype=dtype, attention_backend="cpu")
    assert loaded.model.model.rotary_emb.cos.dtype == torch.float32
    assert loaded.model.model.norm.weight.dtype == getattr(torch, dtype)
    native = first_token_logits(0, dtype, "cpu")
    torch.testing.assert_close(native, first_token_logits(0, dtype, "torch"), atol=0.01, rtol=0)
    torch.testing.assert_close(native, first_token_logits(0), atol=0.01, rtol=0)


def test_builtin_model_writes_printable_ascii() -> None:
    """Random weights sample random bytes, which decode to U+FFFD; the built-in model writes text."""
    tokenizer = load_tokenizer(None)
    logits = first_token_logits(0)[0]
    allowed = {i for i in range(logits.numel()) if torch.isfinite(logits[i])}
    assert tokenizer.eos_token_ids <= allowed
    text = tokenizer.decode(sorted(allowed))
    assert len(allowed) == 1 + 96 and text == "\n" + "".join(map(chr, range(32, 127)))
