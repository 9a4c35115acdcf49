"""Turning a decoded request into SamplingParams, with OpenAI-style 400s for values out of range.

Limits chosen here (documented in the API reference):
- every integer fits the wire to the workers (int64; protocol.py's WireInt checks while decoding);
- n: 1..MAX_N choices per prompt; each one is a sequence in the KV cache, so it is capped, and so
  are the choices of one request (prompts × n, --max-request-choices);
- logprobs / top_logprobs: 0..MAX_LOGPROBS alternatives per token, as OpenAI.
- max_tokens: at least 1; by default the checkpoint's max_new_tokens or the rest of the context
  window after the prompt, whichever is smaller, and a prompt plus max_tokens must fit in the window.
- A sampling value the request leaves out comes from the checkpoint's generation_config.json
  (GenerationDefaults), else from SamplingParams' own default, as in transformers and vLLM.
- temperature >= 0 (0 is greedy), 0 < top_p <= 1, top_k >= -1 (0 and -1 disable it),
  0 <= min_p <= 1, presence and frequency penalties in [-2, 2], repetition_penalty > 0;
- at most MAX_STOP stop strings, none empty; at most MAX_STOP_TOKEN_IDS stop_token_ids, each in the vocabulary;
- cache_salt, when given, is not empty: an empty salt would look like a salt and be none.
"""

from __future__ import annotations

from typing import TypeVar

from msgspec import structs

from paged.gateway.api.errors import APIError
from paged.gateway.api.protocol import SamplingRequest
from paged.shared.sampling_params import GenerationDefaults, SamplingParams

T = TypeVar("T")

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_TOKEN_IDS = 256


def check_model(requested: str | None, served_model_name: str) -> None:
    if requested is not None and requested != served_model_name:
        raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")


def stop_strings(request: SamplingRequest) -> list[str]:
    stop = request.stop
    return [stop] if isinstance(stop, str) else list(stop or [])


def check_cache_salt(request: SamplingRequest) -> None:
    if request.cache_salt == "":
        message = "cache_salt must be a non-empty string; omit it (or send null) to share the unsalted cache"
        raise APIError(400, message, param="cache_salt")


def check_echo(echo: bool) -> None:
    """A client that asks for the prompt back (scoring harnesses read its logprobs) must not get a
    completion without it as if it were the answer."""
    _require(not echo, "echo", "echo is not supported: the completion does not repeat the prompt or score its tokens")


def check_choices(num_prompts: int, n: int, limit: int) -> None:
    """One request may not ask for more than `limit` choices (prompts × n): each is a sequence to
    schedule, detokenize and stream, and thousands of them would stall the server for everyone."""
    total = num_prompts * n
    if total > limit:
        raise APIError(
            400,
            f"this request asks for {total} choices ({num_prompts} prompts × n={n}); the limit is {limit} per request",
            param="n" if n > 1 else "prompt",
        )


def sampling_params(
    request: SamplingRequest,
    logprobs: int | None,
    vocab_size: int,
    logprobs_param: str = "logprobs",
    defaults: GenerationDefaults = GenerationDefaults(),
) -> SamplingParams:
    """Everything but max_tokens, which depends on each prompt's length (see fit_to_context)."""
    temperature = _default(request.temperature, _default(defaults.temperature, 1.0))
    top_p = _default(request.top_p, _default(defaults.top_p, 1.0))
    top_k = _default(request.top_k, _default(defaults.top_k, 0))
    min_p = _default(request.min_p, _default(defaults.min_p, 0.0))
    n = _default(request.n, 1)
    presence_penalty = _default(request.presence_penalty, 0.0)
    frequency_penalty = _default(request.frequency_penalty, 0.0)
    repetition_penalty = _default(request.repetition_penalty, _default(defaults.repetition_penalty, 1.0))
    stop_token_ids = tuple(request.stop_token_ids or ())
    stop = stop_strings(request)
    # Every generated token is checked against each stop string on the event loop, and the stop
    # token ids travel to the workers with each sequence: both lists are kept short.
    _require(len(stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    _require("" not in stop, "stop", "stop strings must not be empty")
    message = f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(stop_token_ids)}"
    _require(len(stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", message)
    _require(temperature >= 0, "temperature", f"temperature must be >= 0, got {temperature}")
    _require(0 < top_p <= 1, "top_p", f"top_p must be in (0, 1], got {top_p}")
    _require(top_k >= -1, "top_k", f"top_k must be -1, 0 (disabled) or positive, got {top_k}")
    _require(0 <= min_p <= 1, "min_p", f"min_p must be in [0, 1], got {min_p}")
    _require(1 <= n <= MAX_N, "n", f"n must be between 1 and {MAX_N}, got {n}")
    for name, penalty in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        _require(-2 <= penalty <= 2, name, f"{name} must be in [-2, 2], got {penalty}")
    _require(repetition_penalty > 0, "repetition_penalty", f"repetition_penalty must be > 0, got {repetition_penalty}")
    for i, token_id in enumerate(stop_token_ids):
        message = f"stop token id {token_id} is outside the vocabulary (0..{vocab_size - 1})"
        _require(0 <= token_id < vocab_size, f"stop_token_ids[{i}]", message)
    if logprobs is not None:
        message = f"{logprobs_param} must be between 0 and {MAX_LOGPROBS}, got {logprobs}"
        _require(0 <= logprobs <= MAX_LOGPROBS, logprobs_param, message)
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        min_p=min_p,
        seed=request.seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logprobs=logprobs,
        n=n,
        stop_token_ids=stop_token_ids,
        ignore_eos=request.ignore_eos,
    )


def check_max_tokens(max_tokens: int | None, param: str = "max_tokens") -> None:
    if max_tokens is not None:
        _require(max_tokens >= 1, param, f"{param} must be at least 1, got {max_tokens}")


def fit_to_context(
    params: SamplingParams,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    prompt_param: str,
    max_tokens_param: str,
    default_max_tokens: int | None = None,
) -> SamplingParams:
    """Set max_tokens for one prompt: as asked if prompt + max_tokens fits the context window,
    else 400 with the numbers; by default whatever room the prompt leaves, at most
    `default_max_tokens` (the checkpoint's max_new_tokens) when given."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        room = max_model_len - prompt_len
        return structs.replace(params, max_tokens=min(room, default_max_tokens) if default_max_tokens else room)
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return structs.replace(params, max_tokens=max_tokens)


def _default(value: T | None, default: T) -> T:
    return default if value is None else value


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise APIError(400, message, param=param, code="invalid_value")
