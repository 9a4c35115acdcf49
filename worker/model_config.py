"""A Hugging Face config.json reduced to what the Llama-family decoder needs, validated once at load time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_SCALING = ("llama3", "linear")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class ModelConfigError(ValueError):
    """config.json describes a model this decoder cannot run, or is malformed."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, with the parameters transformers' modeling_rope_utils reads."""

    rope_type: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # config.json's only; shared/tokenizer.py adds generation_config.json's
    torch_dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    qkv_bias: bool  # Qwen2 always, Llama/Qwen3 with attention_bias
    o_bias: bool  # Llama/Qwen3 with attention_bias
    mlp_bias: bool  # Llama with mlp_bias
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None  # Mistral-style local attention window; we cap the context to it instead

    @property
    def max_model_len(self) -> int:
        """Longest sequence this decoder runs exactly: beyond a sliding window full attention would differ."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def block_context_cost(self, block_size: int) -> float:
        """What one block of context adds to the cost of computing a token, relative to the token's
        cost without context (the depth eviction policy's slope, docs/kv-store.md). Per token,
        attention reads block_size more keys and values in every layer (2 FLOPs for the score and 2
        for the weighted value, per query head and head dimension), against 2 FLOPs per weight of
        every layer's projections and MLP and of the LM head."""
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        per_layer = self.hidden_size * (2 * q_width + 2 * kv_width) + 3 * self.hidden_size * self.intermediate_size
        per_token = 2 * (self.num_layers * per_layer + self.vocab_size * self.hidden_size)
        return 4 * self.num_layers * q_width * block_size / per_token

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelArch:
        """Validate a parsed config.json; `source` names the file in errors."""
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise ModelConfigError(
                f"{source}: unsupported architecture {architectures or 'missing'}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            return cls._parse(architecture, config, source)
        except KeyError as missing:
            raise ModelConfigError(f"{source}: missing field {missing} for {architecture}") from None

    @classmethod
    def _parse(cls, architecture: str, config: dict[str, Any], source: str) -> ModelArch:
        if config.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
        num_heads = int(config["num_attention_heads"])
        hidden_size = int(config["hidden_size"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ModelConfigError(f"{source}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelConfigError(f"{source}: partial_rotary_factor {config['partial_rotary_factor']} is not supported")
        rope_theta, rope_scaling = parse_rope(config, source)
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        if dtype not in SUPPORTED_DTYPES:
            raise ModelConfigError(f"{source}: torch_dtype {dtype!r} is not supported ({', '.join(SUPPORTED_DTYPES)})")
        attention_bias = bool(config.get("attention_bias", False))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        # Qwen2 and Qwen3 decide sliding windows per layer with use_sliding_window (off in released models).
        uses_window = config.get("use_sliding_window", True) if architecture != "LlamaForCausalLM" else False
        return cls(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=as_id_tuple(config.get("eos_token_id")),
            torch_dtype=dtype,
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=architecture == "LlamaForCausalLM" and bool(config.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_window=config.get("sliding_window") if uses_window else None,
        )


def parse_rope(config: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either layout: transformers 5's `rope_parameters` or the older
    top-level `rope_theta` plus `rope_scaling`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None
    if rope_type not in SUPPORTED_ROPE_SCALING:
        raise ModelConfigError(
            f"{source}: rope scaling type {rope_type!r} is not supported; supported: default, {', '.join(SUPPORTED_ROPE_SCALING)}"
        )
    if rope_type == "linear":
        return rope_theta, RopeScaling("linear", float(params["factor"]))
    return rope_theta, RopeScaling(
        "llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
        ),
    )


def as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    """Token-id fields may hold one id, a list of ids, or nothing."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load_model_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: invalid JSON ({exc})") from None
    return ModelArch.from_dict(config, source=str(path))
