"""config.json parsing: derived fields, both rope layouts, per-architecture flags."""

from __future__ import annotations

import pytest

from paged.worker.model_config import ModelArch, ModelConfigError, RopeScaling

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}

REMOVE = object()  # marks a field to drop from BASE


def test_defaults_and_derived_fields() -> None:
    arch = ModelArch.from_dict(BASE)
    assert (arch.num_kv_heads, arch.head_dim) == (8, 8)  # no GQA given: MHA; head_dim = hidden / heads
    assert arch.rope_scaling is None and arch.rope_theta == 10000.0
    assert arch.eos_token_ids == () and arch.torch_dtype == "float32"


def test_old_rope_layout_and_eos_list() -> None:
    arch = ModelArch.from_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [2, 7]}
    )
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == RopeScaling("linear", 2.0)
    assert arch.eos_token_ids == (2, 7)


def test_new_rope_layout_llama3() -> None:
    params = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    arch = ModelArch.from_dict({**BASE, "max_position_embeddings": 4096, "rope_parameters": params, "dtype": "bfloat16"})
    assert arch.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=4096)
    assert arch.torch_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("architecture", "extra", "flags"),
    [
        ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 128}, (True, False, False, None)),
        ("Qwen3ForCausalLM", {"attention_bias": True}, (True, True, True, None)),
        ("MistralForCausalLM", {"sliding_window": 128}, (False, False, False, 128)),
    ],
)
def test_architecture_flags(architecture: str, extra: dict, flags: tuple) -> None:
    arch = ModelArch.from_dict({**BASE, "architectures": [architecture], **extra})
    assert (arch.qkv_bias, arch.o_bias, arch.qk_norm, arch.sliding_window) == flags
    if arch.sliding_window:
        assert arch.max_model_len == arch.sliding_window


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"architectures": ["BertModel"]}, r"unsupported architecture \['BertModel'\]"),
        ({"architectures": None}, "unsupported architecture missing"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"num_key_value_heads": 3}, "num_attention_heads 8 is not a multiple of num_key_value_heads 3"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
        ({"torch_dtype": "float8_e4m3fn"}, "torch_dtype 'float8_e4m3fn' is not supported"),
        ({"vocab_size": REMOVE}, "missing field 'vocab_size'"),
    ],
)
def test_rejections_name_the_file(override: dict, message: str) -> None:
    config = {key: value for key, value in {**BASE, **override}.items() if value is not REMOVE}
    with pytest.raises(ModelConfigError, match=rf"^/m/config\.json: {message}"):
        ModelArch.from_dict(config, source="/m/config.json")


def test_block_context_cost_weighs_attention_against_the_weights() -> None:
    # Llama-3-8B's shape: a block of 16 tokens of context adds about 0.06% to computing a token.
    llama8b = ModelArch.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    })  # fmt: skip
    weights = 32 * (4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336) + 128256 * 4096
    assert llama8b.block_context_cost(16) == pytest.approx(4 * 32 * 4096 * 16 / (2 * weights))
    assert 0.0005 < llama8b.block_context_cost(16) < 0.0007
    tiny = ModelArch.from_dict(BASE)  # a tiny model spends far more of a token's work on attention
    assert tiny.block_context_cost(16) > 100 * llama8b.block_context_cost(16)
    assert tiny.block_context_cost(32) == pytest.approx(2 * tiny.block_context_cost(16))
