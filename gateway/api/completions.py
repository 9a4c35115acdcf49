"""POST /v1/completions: text or token-id prompts, streamed (SSE) or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from paged.gateway.api.disconnect import cancel_on_disconnect
from paged.gateway.api.errors import APIError
from paged.gateway.api.generation import ChoiceUpdate, Generation
from paged.gateway.api.logprobs import completion_logprobs
from paged.gateway.api.protocol import CompletionRequest
from paged.gateway.api.request_body import decode_body, read_body
from paged.gateway.api.respond import respond
from paged.gateway.api.state import ApiState
from paged.gateway.api.validation import (
    check_cache_salt,
    check_choices,
    check_echo,
    check_max_tokens,
    check_model,
    fit_to_context,
    sampling_params,
)

PROMPT_TYPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


async def create_completion(request: Request) -> Response:
    state: ApiState = request.app.state.api
    body = decode_body(await read_body(request, state.limits.max_body_size, state.limits.body_timeout), CompletionRequest)
    return await cancel_on_disconnect(request, _complete(state, body))


async def _complete(state: ApiState, body: CompletionRequest) -> Response:
    check_model(body.model, state.served_model_name)
    state.check_ready()
    check_cache_salt(body)
    check_echo(body.echo)
    defaults = state.generation_defaults
    params = sampling_params(body, body.logprobs, state.tokenizer.vocab_size, defaults=defaults)
    check_max_tokens(body.max_tokens)
    prompts = split_prompts(body.prompt)
    check_choices(len(prompts), params.n, state.limits.max_request_choices)
    max_model_len = state.engine.max_model_len
    token_ids = await _prompt_token_ids(state, prompts, max_model_len)
    per_prompt = [
        (p, fit_to_context(params, body.max_tokens, len(p), max_model_len, "prompt", "max_tokens", defaults.max_tokens))
        for p in token_ids
    ]
    return await respond(state, body, "cmpl", per_prompt, _Formatter, endpoint="completions", prompts=len(prompts), n=params.n)


def split_prompts(prompt: str | list[str | int | list[int]]) -> list[str] | list[list[int]]:
    """The request's prompts: all texts, or all token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return prompt  # type: ignore[return-value]
    if all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    if all(isinstance(p, list) for p in prompt):
        return prompt  # type: ignore[return-value]
    raise APIError(400, f"prompt must be {PROMPT_TYPES}, not a mix", param="prompt")


async def _prompt_token_ids(state: ApiState, prompts: list[str] | list[list[int]], max_model_len: int) -> list[list[int]]:
    """Text gets the tokenizer's special tokens (BOS); ids are used as they are."""
    if isinstance(prompts[0], str):
        return await state.prompts.encode(prompts, add_special_tokens=True, max_model_len=max_model_len, param="prompt")  # type: ignore[arg-type]
    return [_checked_ids(p, state.tokenizer.vocab_size) for p in prompts]  # type: ignore[arg-type]


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
    return ids


class _Formatter:
    """OpenAI's text_completion objects, streamed or whole."""

    def __init__(self, state: ApiState, request_id: str, body: CompletionRequest) -> None:
        self._state = state
        self._body = body
        self._head = {
            "id": request_id, "object": "text_completion", "created": int(time.time()), "model": state.served_model_name
        }
        self._text_offsets: dict[int, int] = {}  # per choice: characters of the tokens so far

    def _logprobs(self, update: ChoiceUpdate) -> dict[str, Any] | None:
        if update.logprobs is None:
            return None
        # Offsets follow the tokens, not the text sent so far: text held back (a possible stop string,
        # half a character) arrives in a later chunk than its token's logprobs.
        offset = self._text_offsets.get(update.index, 0)
        logprobs = completion_logprobs(self._state.token_strings, update.token_ids, update.logprobs, update.top_logprobs, offset)
        self._text_offsets[update.index] = offset + sum(len(token) for token in logprobs["tokens"])
        return logprobs

    async def chunks(self, generation: Generation) -> AsyncIterator[dict[str, Any]]:
        include_usage = self._body.include_usage
        async for updates in generation.updates():
            for update in updates:
                choice = {
                    "index": update.index,
                    "text": update.text,
                    "logprobs": self._logprobs(update),
                    "finish_reason": update.finish_reason,
                }
                yield {**self._head, "choices": [choice], **({"usage": None} if include_usage else {})}
        if include_usage:
            yield {**self._head, "choices": [], "usage": generation.usage()}

    async def collect(self, generation: Generation) -> dict[str, Any]:
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(generation.num_choices)]
        async for updates in generation.updates():
            for update in updates:
                choice = choices[update.index]
                logprobs = self._logprobs(update)
                if logprobs is not None:
                    choice["logprobs"] = _merged(choice["logprobs"], logprobs)
                choice["text"] += update.text
                choice["finish_reason"] = update.finish_reason
        return {**self._head, "choices": choices, "usage": generation.usage()}


def _merged(total: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return more
    for key in ("tokens", "token_logprobs", "text_offset"):
        total[key] += more[key]
    if more["top_logprobs"] is not None:
        total["top_logprobs"] = (total["top_logprobs"] or []) + more["top_logprobs"]
    return total
