"""Per-request generation parameters, shared by the gateway (stop rules, limits) and the worker (sampling)."""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """What the user asked for, already validated by the HTTP layer.

    The worker reads only the sampling fields; the gateway reads the limits and stop rules.
    One struct for both keeps a request's parameters in one place on the wire.
    """

    # Sampling (worker).
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's logprob plus the top-k

    # Limits and stop rules (gateway).
    n: int = 1
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class GenerationDefaults(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """A checkpoint's sampling defaults (its generation_config.json), for what a request leaves
    out. As in transformers and vLLM: a value the request sets wins, then the checkpoint's, then
    SamplingParams' own default. None: the checkpoint sets nothing."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config's max_new_tokens
