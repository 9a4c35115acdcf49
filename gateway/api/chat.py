"""POST /v1/chat/completions: messages rendered with the chat template, streamed (SSE) or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from paged.gateway.api.disconnect import cancel_on_disconnect
from paged.gateway.api.errors import APIError
from paged.gateway.api.generation import ChoiceUpdate, Generation
from paged.gateway.api.logprobs import chat_logprobs
from paged.gateway.api.protocol import ChatCompletionRequest
from paged.gateway.api.request_body import decode_body, read_body
from paged.gateway.api.respond import respond
from paged.gateway.api.state import ApiState
from paged.gateway.api.validation import (
    check_cache_salt,
    check_choices,
    check_max_tokens,
    check_model,
    fit_to_context,
    sampling_params,
)


async def create_chat_completion(request: Request) -> Response:
    state: ApiState = request.app.state.api
    body = decode_body(await read_body(request, state.limits.max_body_size, state.limits.body_timeout), ChatCompletionRequest)
    return await cancel_on_disconnect(request, _chat(state, body))


async def _chat(state: ApiState, body: ChatCompletionRequest) -> Response:
    check_model(body.model, state.served_model_name)
    state.check_ready()
    check_cache_salt(body)
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    defaults = state.generation_defaults
    params = sampling_params(body, (body.top_logprobs or 0) if body.logprobs else None, state.tokenizer.vocab_size, "top_logprobs", defaults)
    max_tokens, max_tokens_param = (
        (body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    check_max_tokens(max_tokens, max_tokens_param)
    check_choices(1, params.n, state.limits.max_request_choices)
    text = await state.prompts.render_chat(body.messages)
    max_model_len = state.engine.max_model_len
    # The template writes BOS itself.
    [prompt] = await state.prompts.encode([text], add_special_tokens=False, max_model_len=max_model_len, param="messages")
    params = fit_to_context(params, max_tokens, len(prompt), max_model_len, "messages", max_tokens_param, defaults.max_tokens)
    return await respond(
        state, body, "chatcmpl", [(prompt, params)], _Formatter,
        endpoint="chat", prompt_tokens=len(prompt), n=params.n,
    )


class _Formatter:
    """OpenAI's chat.completion and chat.completion.chunk objects."""

    def __init__(self, state: ApiState, request_id: str, body: ChatCompletionRequest) -> None:
        self._state = state
        self._body = body
        self._id = request_id
        self._created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self._id, "object": obj, "created": self._created, "model": self._state.served_model_name}

    def _logprobs(self, update: ChoiceUpdate) -> list[dict[str, Any]] | None:
        if update.logprobs is None:
            return None
        return chat_logprobs(self._state.token_strings, update.token_ids, update.logprobs, update.top_logprobs)

    async def chunks(self, generation: Generation) -> AsyncIterator[dict[str, Any]]:
        usage = {"usage": None} if self._body.include_usage else {}
        head = self._head("chat.completion.chunk")
        for index in range(generation.num_choices):
            role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield {**head, "choices": [role], **usage}
        async for updates in generation.updates():
            for update in updates:
                logprobs = self._logprobs(update)
                choice = {
                    "index": update.index,
                    "delta": {"content": update.text} if update.text else {},
                    "logprobs": {"content": logprobs} if logprobs is not None else None,
                    "finish_reason": update.finish_reason,
                }
                yield {**head, "choices": [choice], **usage}
        if self._body.include_usage:
            yield {**head, "choices": [], "usage": generation.usage()}

    async def collect(self, generation: Generation) -> dict[str, Any]:
        texts = [""] * generation.num_choices
        logprobs: list[list[dict[str, Any]] | None] = [None] * generation.num_choices
        finish: list[str | None] = [None] * generation.num_choices
        async for updates in generation.updates():
            for update in updates:
                texts[update.index] += update.text
                finish[update.index] = update.finish_reason
                more = self._logprobs(update)
                if more is not None:
                    logprobs[update.index] = (logprobs[update.index] or []) + more
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": logprobs[i]} if logprobs[i] is not None else None,
                "finish_reason": finish[i],
            }
            for i in range(generation.num_choices)
        ]
        return {**self._head("chat.completion"), "choices": choices, "usage": generation.usage()}
