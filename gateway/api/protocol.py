"""Request bodies of the OpenAI-compatible API, decoded and type-checked by msgspec.

Unknown fields are ignored, as OpenAI does. Every optional field is nullable because clients
(curl users especially) send `null` for "use the default"; validation.py fills the defaults.
Every integer must fit what the wire to the workers carries (WireInt): msgspec refuses one
outside while decoding, naming the field, so no step ever fails to encode.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from paged.shared.protocol import WIRE_INT_MAX, WIRE_INT_MIN

WireInt = Annotated[int, msgspec.Meta(ge=WIRE_INT_MIN, le=WIRE_INT_MAX)]
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]  # OpenAI's roles


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class SamplingRequest(msgspec.Struct, kw_only=True):
    """The fields completions and chat completions share."""

    model: str | None = None
    max_tokens: WireInt | None = None  # default: the rest of the context window
    temperature: float | None = None
    top_p: float | None = None
    top_k: WireInt | None = None  # 0 or -1: disabled
    min_p: float | None = None
    n: WireInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[WireInt] | None = None
    seed: WireInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: WireInt = 0  # extension: lower runs first under priority scheduling
    cache_salt: str | None = None  # extension: isolates this request's prefix-cache entries

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists; msgspec cannot
    # tell list[str] from list[int] in a union, so the element type is checked in validation.py.
    prompt: str | list[str | WireInt | list[WireInt]]
    logprobs: WireInt | None = None  # number of top alternatives; None: no logprobs
    echo: bool = False  # repeating the prompt (and its logprobs) is not offered: true is refused


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: ChatRole
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: WireInt | None = None  # newer OpenAI name of max_tokens; wins when both are set
    logprobs: bool | None = False
    top_logprobs: WireInt | None = None
