"""Prompts tokenized and chat templates rendered on a small thread pool, never on the event loop.

Tokenizing a long prompt takes a while (a megabyte of text: about half a second); on the event loop
it would stall every stream, and the heartbeats that keep the workers' link alive. `tokenizers`
releases the GIL in encode_batch, so the loop runs on while a pool thread encodes. A chat template is
rendered by jinja2, in Python, holding the GIL; in a thread the loop still gets its turn at every
switch interval. Before any of this, a text whose length alone proves it cannot fit the context
window is refused (prompt_bound.py), so a megabytes-long prompt costs nothing but the 400.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from paged.gateway.api.chat_template import ChatTemplate
from paged.gateway.api.prompt_bound import check_prompt_chars, max_chars_per_token
from paged.gateway.api.protocol import ChatMessage
from paged.shared.tokenizer import Tokenizer

T = TypeVar("T")

POOL_THREADS = 4  # requests tokenized at once; the rest queue, off the loop


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One pool for the process: tokenizers are thread-safe, and every app (tests build many) shares it."""
    return ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="tokenize")


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._max_chars_per_token = max_chars_per_token(tokenizer)

    async def encode(self, texts: list[str], *, add_special_tokens: bool, max_model_len: int, param: str) -> list[list[int]]:
        """Token ids of each text; a text that cannot fit `max_model_len` tokens is a 400 naming `param`
        before anything is tokenized."""
        for text in texts:
            check_prompt_chars(text, self._max_chars_per_token, max_model_len, param)
        return await _off_loop(self._tokenizer.encode_batch, texts, add_special_tokens)

    async def render_chat(self, messages: list[ChatMessage]) -> str:
        """The chat template applied to `messages`; even preparing a quarter of a million (8 MiB of
        them) for the template takes a tenth of a second, so that happens off the loop too."""
        return await _off_loop(self._template.render_messages, messages)


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_pool(), function, *args)
