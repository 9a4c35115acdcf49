"""What every API handler needs, kept on `app.state.api`."""

from __future__ import annotations

from dataclasses import dataclass

from paged.gateway.api.errors import DEFAULT_RETRY_AFTER_S, APIError
from paged.gateway.api.logprobs import TokenStrings
from paged.gateway.api.metrics import Metrics
from paged.gateway.api.prompt_tokenizer import PromptTokenizer
from paged.gateway.engine_client import EngineClient
from paged.shared.config import HttpConfig
from paged.shared.sampling_params import GenerationDefaults
from paged.shared.tokenizer import Tokenizer


@dataclass
class ApiState:
    engine: EngineClient
    tokenizer: Tokenizer
    served_model_name: str
    metrics: Metrics
    prompts: PromptTokenizer
    token_strings: TokenStrings
    limits: HttpConfig
    created: int  # unix time the model was loaded, for /v1/models
    generation_defaults: GenerationDefaults  # the checkpoint's, for what a request leaves out

    def check_ready(self) -> None:
        """503 before tokenizing anything when no worker could run the request."""
        if self.engine.is_draining():
            raise APIError(503, "the server is draining and accepts no new requests", code="server_draining",
                           retry_after=DEFAULT_RETRY_AFTER_S)
        if not self.engine.is_ready():
            raise APIError(503, "no worker is ready yet", code="server_starting", retry_after=DEFAULT_RETRY_AFTER_S)
