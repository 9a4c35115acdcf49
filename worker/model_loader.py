"""Load a Hugging Face Llama-family checkpoint (or the built-in model) into a paged-attention decoder.

Every tensor the decoder expects is checked for presence and shape before anything is assigned, so a
broken directory fails with one ModelLoadError naming the file and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from paged.shared.logging import get_logger
from paged.worker.attention import cpu_ops
from paged.worker.attention.backend import AttentionBackendName, AttentionOps, get_attention_ops
from paged.worker.builtin_model import BUILTIN_ARCH, build_builtin_model
from paged.worker.model_config import ModelArch, ModelConfigError, load_model_arch
from paged.worker.models.llama import LlamaForCausalLM

log = get_logger("worker.model_loader")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_INITIALIZERS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model directory cannot be loaded; the message names the file and the problem."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    arch: ModelArch
    dtype: torch.dtype
    device: torch.device
    model_dir: Path | None  # None: the built-in model


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """"auto" keeps the checkpoint's dtype on accelerators; CPUs get float32, which they run fastest and exactly."""
    if dtype == "auto":
        return DTYPES[checkpoint_dtype] if device.type != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextmanager
def uninitialized_weights(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` with their random initializers skipped: the checkpoint overwrites
    every weight, and initializing a billion parameters would take minutes. (The meta device would
    do the same, but its first use in a process costs seconds of lazy operator registration.)"""
    saved_init = {name: getattr(nn.init, name) for name in _INITIALIZERS}
    saved_dtype = torch.get_default_dtype()
    try:
        for name in _INITIALIZERS:
            setattr(nn.init, name, _keep)
        torch.set_default_dtype(dtype)
        yield
    finally:
        for name, initializer in saved_init.items():
            setattr(nn.init, name, initializer)
        torch.set_default_dtype(saved_dtype)


def _keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def load_model(
    model_dir: str | Path | None,
    dtype: str = "auto",
    device: str = "cpu",
    attention_backend: AttentionBackendName = "torch",
    seed: int = 0,
) -> LoadedModel:
    """A ready, eval-mode decoder. model_dir None: the built-in model with weights from `seed`.
    dtype: "auto" (checkpoint's on GPU, float32 on CPU), "float32", "bfloat16" or "float16"."""
    torch_device = torch.device(device)
    ops = get_attention_ops(attention_backend)
    if model_dir is None:
        torch_dtype = resolve_dtype(dtype, BUILTIN_ARCH.torch_dtype, torch_device)
        model = build_builtin_model(ops, seed).to(torch_device)
        # The weights take the dtype, as on the checkpoint path below; a cast of the whole module would
        # also round the rotary tables, which stay float32 (exact, and what the fused CPU rotary reads).
        model.load_state_dict({name: tensor.to(torch_dtype) for name, tensor in model.state_dict().items()}, assign=True)
        _use_native_layers(model, ops, torch_device, torch_dtype)
        log.info("model_loaded", progress=f"model loaded ({str(torch_dtype).removeprefix('torch.')})", model="builtin", seed=seed, dtype=str(torch_dtype), device=str(torch_device))
        return LoadedModel(model.requires_grad_(False).eval(), BUILTIN_ARCH, torch_dtype, torch_device, None)

    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: model directory not found")
    try:
        arch = load_model_arch(root)
    except ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    torch_dtype = resolve_dtype(dtype, arch.torch_dtype, torch_device)
    with uninitialized_weights(torch_dtype), torch_device:
        model = LlamaForCausalLM(arch, ops)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tensors = read_checkpoint(root, expected, torch_dtype, torch_device)
    model.load_state_dict(tensors, strict=True, assign=True)
    model = model.to(torch_device)  # moves the rotary tables, which are built on the CPU
    _use_native_layers(model, ops, torch_device, torch_dtype)
    log.info(
        "model_loaded", progress=f"model loaded ({arch.architecture}, {str(torch_dtype).removeprefix('torch.')})",
        model=str(root), architecture=arch.architecture, dtype=str(torch_dtype), device=str(torch_device),
    )  # fmt: skip
    return LoadedModel(model.requires_grad_(False).eval(), arch, torch_dtype, torch_device, root)


def _use_native_layers(model: LlamaForCausalLM, ops: AttentionOps, device: torch.device, dtype: torch.dtype) -> None:
    """The native CPU backend brings fused element-wise layers with its attention kernel, and in float32
    linear layers over packed weights."""
    if ops is cpu_ops and device.type == "cpu":
        model.use_fused_ops(cpu_ops.fused_ops())
        if dtype == torch.float32:
            model.use_native_linear(cpu_ops.native_linear())


def shard_files(root: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read, each with the tensor names the index assigns to it (None: all)."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
        shards: dict[Path, list[str] | None] = {}
        for name, file in weight_map.items():
            shards.setdefault(root / file, []).append(name)  # type: ignore[union-attr]
        for path in shards:
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard listed in {index_path} not found")
        return shards
    single = root / SINGLE_FILE
    if not single.is_file():
        raise ModelLoadError(f"{single}: file not found (nor {INDEX_FILE}); only safetensors checkpoints are supported")
    return {single: None}


def read_checkpoint(
    root: Path, expected: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Every expected tensor, shape-checked and converted; raises ModelLoadError naming the offending file."""
    tensors: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    shards = shard_files(root)
    for number, (path, names) in enumerate(shards.items(), start=1):
        try:
            with safe_open(path, framework="pt", device=str(device)) as file:
                for name in names if names is not None else file.keys():
                    if name not in expected:
                        ignored.append(name)  # e.g. a tied lm_head.weight or rotary inv_freq buffers
                        continue
                    shape = tuple(file.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise ModelLoadError(
                            f"{path}: tensor {name} has shape {list(shape)}, but config.json implies {list(expected[name])}"
                        )
                    tensors[name] = file.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from None
        log.info("shard_loaded", file=path.name, shard=f"{number}/{len(shards)}", tensors_so_far=len(tensors))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        where = ", ".join(str(p) for p in shards)
        raise ModelLoadError(f"{where}: missing {len(missing)} tensor(s) the config requires, e.g. {missing[:5]}")
    if ignored:
        log.info("checkpoint_tensors_ignored", count=len(ignored), examples=ignored[:5])
    return tensors
