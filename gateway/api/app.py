"""The starlette application of the OpenAI-compatible API."""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from paged.gateway.api.auth import ApiKeyMiddleware
from paged.gateway.api.chat import create_chat_completion
from paged.gateway.api.chat_template import ChatTemplate
from paged.gateway.api.completions import create_completion
from paged.gateway.api.errors import APIError, InternalErrorMiddleware, api_error_handler, http_error_handler
from paged.gateway.api.health import health
from paged.gateway.api.logprobs import TokenStrings
from paged.gateway.api.metrics import Metrics
from paged.gateway.api.models import list_models
from paged.gateway.api.prompt_tokenizer import PromptTokenizer
from paged.gateway.api.state import ApiState
from paged.gateway.engine_client import EngineClient
from paged.shared.config import HttpConfig
from paged.shared.sampling_params import GenerationDefaults
from paged.shared.tokenizer import Tokenizer


def build_app(
    engine: EngineClient,
    tokenizer: Tokenizer,
    served_model_name: str,
    api_key: str | None = None,
    http: HttpConfig | None = None,
    generation_defaults: GenerationDefaults = GenerationDefaults(),
) -> Starlette:
    metrics = Metrics(engine)
    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    middleware = [Middleware(InternalErrorMiddleware)]
    if api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={APIError: api_error_handler, HTTPException: http_error_handler},
    )
    app.state.api = ApiState(
        engine=engine,
        tokenizer=tokenizer,
        served_model_name=served_model_name,
        metrics=metrics,
        prompts=PromptTokenizer(tokenizer, ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)),
        token_strings=TokenStrings(tokenizer),
        limits=http or HttpConfig(),
        created=int(time.time()),
        generation_defaults=generation_defaults,
    )
    return app
