"""`pagedd`: the paged daemon and its debugging commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import uvloop

from paged.gateway.admin.server import AdminSettings, AdminSocketError
from paged.gateway.cli_options import build_config, config_options
from paged.gateway.config_file import check_config_option, config_file_option, config_file_path
from paged.gateway.config_reload import ConfigReloader
from paged.gateway.daemon import run_daemon
from paged.gateway.drain import DEFAULT_DRAIN_TIMEOUT_S
from paged.gateway.engine import AsyncEngine, WorkerSpec
from paged.gateway.worker_link import RegistrationError
from paged.gateway.worker_processes import RuntimeDir, local_workers
from paged.shared.config import CacheConfig, HttpConfig, ModelConfig, SchedulerConfig
from paged.shared.logging import LEVELS, configure_logging
from paged.shared.sampling_params import SamplingParams
from paged.shared.startup_failure import StartupError, check_model_directory, exit_on_startup_failure
from paged.shared.tokenizer import TokenizerLoadError, load_tokenizer
from paged.worker.server import GATEWAY_TIMEOUT_S, GatewayLossPolicy, run_worker

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_file_option
@check_config_option
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
@click.option("--log-json/--log-console", default=None, help="JSON lines (default when stderr is not a terminal).")
def main(log_level: str, log_json: bool | None) -> None:
    """paged: an LLM inference server built around PagedAttention."""
    configure_logging(log_level, json=log_json)


@main.command()
@config_options(ModelConfig, only=("model", "dtype", "device", "attention_backend", "max_model_len"))
@click.option("--prompt", default="", show_default=True, help="Text to continue; empty starts from the BOS token alone.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", "sampling_seed", default=None, type=int, help="Sampling seed: same seed, same output.")
@click.option("--n", default=1, show_default=True, type=click.IntRange(1, 16), help="Continuations to sample (share the prompt's blocks).")
def generate(prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int, sampling_seed: int | None, n: int, **kwargs: Any) -> None:
    """Run the engine in-process on one prompt and print the continuation (a debugging tool)."""
    from paged.gateway.llm_engine import LLMEngine  # imports torch: only this command needs it in the gateway process

    engine = LLMEngine(build_config(ModelConfig, kwargs), CacheConfig(), SchedulerConfig())
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=sampling_seed, max_tokens=max_tokens, n=n)
    continuations = engine.generate([engine.encode_prompt(prompt)], params)[0]
    for index, token_ids in enumerate(continuations):
        if n > 1:
            click.echo(f"--- {index}")
        click.echo(prompt + engine.tokenizer.decode(token_ids))


# --- serve, gateway, worker -------------------------------------------------------------------------
# Which side takes which setting: a worker needs the model and the sizing of its page pool; the
# gateway needs the scheduler and the allocation rules, and learns the pool's size at registration.
GATEWAY_CACHE_FIELDS = ("block_size", "kv_allocator", "enable_prefix_caching")
WORKER_CACHE_FIELDS = ("block_size", "kv_cache_memory", "gpu_memory_utilization", "swap_space")


def http_options(command: F) -> F:
    for option in reversed(
        [
            click.option("--host", default="127.0.0.1", show_default=True),
            click.option("--port", default=8000, show_default=True, type=int),
            click.option("--served-model-name", default=None, help="Model name in the API (default: the model directory's name)."),
            click.option("--api-key", default=None, envvar="PAGED_API_KEY", help="Require this Bearer token on /v1 (env PAGED_API_KEY)."),
            click.option("--registration-timeout", default=300.0, show_default=True, help="Seconds to wait for the workers to register."),
            click.option("--drain-timeout", default=DEFAULT_DRAIN_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0), help="On SIGTERM/SIGINT: seconds running requests may take to finish before they are aborted."),
            click.option("--admin-socket", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Admin API unix socket [default: $PAGED_ADMIN_SOCKET, else the runtime directory's paged/admin.sock]."),
            click.option("--admin-port", type=click.IntRange(1, 65535), default=None, help="Also serve the admin API on this loopback port (needs --admin-token)."),
            click.option("--admin-token", default=None, envvar="PAGED_ADMIN_TOKEN", help="Bearer token the admin port requires (env PAGED_ADMIN_TOKEN)."),
        ]
    ):
        command = option(command)
    return config_options(HttpConfig)(command)


null_model_option = click.option("--null-model", is_flag=True, help="Workers run no model and answer fixed tokens (gateway benchmarks).")


def _run_gateway(workers: list[WorkerSpec], model: str | None, cache_config: CacheConfig, kwargs: dict[str, Any]) -> None:
    scheduler_config = build_config(SchedulerConfig, kwargs)
    with exit_on_startup_failure("gateway", StartupError, TokenizerLoadError):
        check_model_directory(model)
        tokenizer = load_tokenizer(model)
    served_model_name = kwargs["served_model_name"] or (Path(model).name if model else "paged-builtin")
    try:
        admin = AdminSettings(kwargs["admin_socket"], kwargs["admin_port"], kwargs["admin_token"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    engine = AsyncEngine(workers, scheduler_config, cache_config, registration_timeout=kwargs["registration_timeout"])
    context = click.get_current_context()
    config_path = config_file_path(context)
    reload = ConfigReloader(context, config_path).reload if config_path else None
    with exit_on_startup_failure("gateway", StartupError, RegistrationError, AdminSocketError):
        uvloop.run(
            run_daemon(
                engine, tokenizer, served_model_name, kwargs["host"], kwargs["port"], kwargs["api_key"], admin,
                drain_timeout=kwargs["drain_timeout"], reload=reload, http=build_config(HttpConfig, kwargs),
            )
        )  # fmt: skip


@main.command()
@config_options(ModelConfig)
@config_options(CacheConfig)
@config_options(SchedulerConfig)
@click.option("--workers", "num_workers", type=click.IntRange(min=1), default=None, help="CPU worker processes [default: 1]; on GPU one per visible device.")
@null_model_option
@http_options
def serve(num_workers: int | None, null_model: bool, **kwargs: Any) -> None:
    """Run the gateway and spawn its workers (one per visible GPU, or --workers N on CPU), then serve HTTP."""
    model_config = build_config(ModelConfig, kwargs)
    cache_config = build_config(CacheConfig, kwargs)
    root = click.get_current_context().find_root().params
    runtime_dir = RuntimeDir()
    try:
        workers = local_workers(
            runtime_dir, model_config, cache_config, kwargs["max_num_batched_tokens"],
            num_workers=num_workers, null_model=null_model, log_level=root["log_level"], log_json=root["log_json"],
        )  # fmt: skip
        _run_gateway(workers, model_config.model, cache_config, kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        runtime_dir.close()


@main.command()
@click.option("--worker", "endpoints", multiple=True, required=True, help="A worker's endpoint (ipc://PATH or tcp://HOST:PORT); repeat per worker.")
@config_options(ModelConfig, only=("model",))
@config_options(CacheConfig, only=GATEWAY_CACHE_FIELDS)
@config_options(SchedulerConfig)
@http_options
def gateway(endpoints: tuple[str, ...], model: str | None, **kwargs: Any) -> None:
    """Run the gateway alone, connecting to workers started with `pagedd worker` (split mode).
    --model names the directory to load the tokenizer from."""
    _run_gateway([WorkerSpec(endpoint) for endpoint in endpoints], model, build_config(CacheConfig, kwargs), kwargs)


@main.command()
@click.option("--endpoint", required=True, help="Where to listen for the gateway: ipc://PATH or tcp://HOST:PORT (tcp://*:PORT for all interfaces).")
@config_options(ModelConfig)
@config_options(CacheConfig, only=WORKER_CACHE_FIELDS)
@config_options(SchedulerConfig, only=("max_num_batched_tokens",))
@null_model_option
@click.option("--worker-id", default=None, help="Name in the gateway's logs [default: HOST:PID].")
@click.option("--on-gateway-loss", type=click.Choice(["exit", "wait"]), default="exit", show_default=True, help="When the gateway's heartbeats stop: exit, or free everything and wait for a gateway.")
@click.option("--gateway-timeout", default=GATEWAY_TIMEOUT_S, show_default=True, help="Seconds without a word from the gateway before it counts as lost.")
def worker(endpoint: str, null_model: bool, worker_id: str | None, on_gateway_loss: GatewayLossPolicy, gateway_timeout: float, **kwargs: Any) -> None:
    """Run one worker process (split mode): load the model, listen on --endpoint, serve one gateway."""
    run_worker(
        endpoint, build_config(ModelConfig, kwargs), build_config(CacheConfig, kwargs), kwargs["max_num_batched_tokens"],
        null_model=null_model, worker_id=worker_id, on_gateway_loss=on_gateway_loss, gateway_timeout=gateway_timeout,
    )  # fmt: skip


if __name__ == "__main__":  # the worker processes `pagedd serve` spawns re-import the main module
    main()
