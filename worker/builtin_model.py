"""The model paged runs when no --model is given: a tiny Llama with seeded random weights, built in memory.

Its vocabulary is the byte-level one of shared/tokenizer.py's built-in tokenizer: <unk>, <s>, </s>, then
the 256 byte values, so every output decodes to (possibly nonsensical) text.
"""

from __future__ import annotations

import torch

from paged.shared.tokenizer import BUILTIN_BOS_ID, BUILTIN_EOS_ID, BUILTIN_VOCAB_SIZE
from paged.worker.attention.backend import AttentionOps
from paged.worker.model_config import ModelArch
from paged.worker.models.llama import LlamaForCausalLM

INIT_STD = 0.02

BUILTIN_ARCH = ModelArch(
    architecture="LlamaForCausalLM",
    vocab_size=BUILTIN_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=172,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    bos_token_id=BUILTIN_BOS_ID,
    eos_token_ids=(BUILTIN_EOS_ID,),
    torch_dtype="float32",
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    qk_norm=False,
    sliding_window=None,
)


def build_builtin_model(attention_ops: AttentionOps, seed: int) -> LlamaForCausalLM:
    """Same seed, same weights, on any machine: every parameter is drawn from one generator in name order."""
    model = LlamaForCausalLM(BUILTIN_ARCH, attention_ops)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    return model
