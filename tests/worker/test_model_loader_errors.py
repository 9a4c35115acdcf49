"""A broken model directory fails with one ModelLoadError naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from paged.worker.model_loader import ModelLoadError, load_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def tiny_checkpoint(root: Path, config: dict = CONFIG) -> dict[str, torch.Tensor]:
    """A valid checkpoint for `config` (tied embeddings, so no lm_head), saved as model.safetensors."""
    (root / "config.json").write_text(json.dumps(config))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv_dim = config["num_key_value_heads"] * head_dim
    h, i = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], h),
        "model.norm.weight": (h,),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.layers.0.post_attention_layernorm.weight": (h,),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.self_attn.k_proj.weight": (kv_dim, h),
        "model.layers.0.self_attn.v_proj.weight": (kv_dim, h),
        "model.layers.0.self_attn.o_proj.weight": (h, h),
        "model.layers.0.mlp.gate_proj.weight": (i, h),
        "model.layers.0.mlp.up_proj.weight": (i, h),
        "model.layers.0.mlp.down_proj.weight": (h, i),
    }
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    save_file(tensors, root / "model.safetensors")
    return tensors


def test_valid_tiny_checkpoint_loads(tmp_path: Path) -> None:
    tensors = tiny_checkpoint(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    tensors = tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, tmp_path / file)
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(tmp_path, dtype="bfloat16")
    assert loaded.model.model.norm.weight.dtype == torch.bfloat16


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json: file not found"):
        load_model(tmp_path)


def test_missing_safetensors(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: file not found"):
        load_model(tmp_path)


def test_missing_shard(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"gone\.safetensors: shard listed in .*index\.json not found"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path, {**CONFIG, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported architecture \['GPT2LMHeadModel'\]"):
        load_model(tmp_path)


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path, {**CONFIG, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelLoadError, match=r"config\.json: rope scaling type 'yarn' is not supported"):
        load_model(tmp_path)


def test_mismatched_shape(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path)
    # The config now promises a wider MLP than the weights have.
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "intermediate_size": 40}))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load_model(tmp_path)


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = tiny_checkpoint(tmp_path)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing 1 tensor.*k_proj"):
        load_model(tmp_path)


def test_untied_checkpoint_without_lm_head(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path, {**CONFIG, "tie_word_embeddings": False})
    with pytest.raises(ModelLoadError, match=r"missing 1 tensor.*lm_head\.weight"):
        load_model(tmp_path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(tmp_path)


def test_unknown_dtype(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported dtype 'int8'"):
        load_model(tmp_path, dtype="int8")
