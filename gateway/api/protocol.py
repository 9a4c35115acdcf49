"""Request bodies of the OpenAI-compatible API, decoded and type-checked by msgspec.

Unknown fields are ignored, as OpenAI does. Every optional field is nullable because clients
(curl users especially) send `null` for "use the default"; validation.py fills the defaults.
"""

from __future__ import annotations

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class SamplingRequest(msgspec.Struct, kw_only=True):
    """The fields completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = None  # default: the rest of the context window
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: disabled
    min_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = 0  # extension: lower runs first under priority scheduling
    cache_salt: str | None = None  # extension: isolates this request's prefix-cache entries

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists; msgspec cannot
    # tell list[str] from list[int] in a union, so the element type is checked in validation.py.
    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None  # number of top alternatives; None: no logprobs


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # newer OpenAI name of max_tokens; wins when both are set
    logprobs: bool | None = False
    top_logprobs: int | None = None
