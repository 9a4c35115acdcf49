"""The model paged runs when no --model is given: a tiny Llama with seeded random weights, built in memory.

Its vocabulary is the byte-level one of shared/tokenizer.py's built-in tokenizer: <unk>, <s>, </s>, then
the 256 byte values. Random weights would sample any byte, and random bytes are almost never valid
UTF-8: a user's first stream would be U+FFFD after U+FFFD. So it generates only printable ASCII,
newline and EOS: nonsense, but text.
"""

from __future__ import annotations

import torch

from paged.shared.tokenizer import BUILTIN_BOS_ID, BUILTIN_EOS_ID, BUILTIN_FIRST_BYTE_ID, BUILTIN_VOCAB_SIZE
from paged.worker.attention.backend import AttentionOps
from paged.worker.model_config import ModelArch
from paged.worker.models.llama import LlamaForCausalLM

INIT_STD = 0.02
GENERATED_BYTES = (ord("\n"), *range(ord(" "), ord("~") + 1))  # what the model may write, with EOS

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


class BuiltinLlama(LlamaForCausalLM):
    """The tiny Llama, its logits -inf outside GENERATED_BYTES and EOS: sampling, greedy or not, and
    the logprobs all see the restricted vocabulary."""

    def __init__(self, arch: ModelArch, attention_ops: AttentionOps) -> None:
        super().__init__(arch, attention_ops)
        mask = torch.full((arch.vocab_size,), float("-inf"))
        mask[[BUILTIN_EOS_ID, *(BUILTIN_FIRST_BYTE_ID + b for b in GENERATED_BYTES)]] = 0.0
        self.register_buffer("output_mask", mask, persistent=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) + self.output_mask


def build_builtin_model(attention_ops: AttentionOps, seed: int) -> LlamaForCausalLM:
    """Same seed, same weights, on any machine: every parameter is drawn from one generator in name order."""
    model = BuiltinLlama(BUILTIN_ARCH, attention_ops)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    return model
