"""The gateway's commands of `pagedd` (the program is put together in ops/pagedd.py): `serve`, the
gateway with its own worker processes, and `gateway`, the gateway alone with workers started
separately (`paged-worker`). Both set the process title `paged-gateway`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import uvloop
from setproctitle import setproctitle

from paged.gateway.admin.listener import AdminSettings, AdminSocketError, bind_admin_socket
from paged.gateway.config_reload import ConfigReloader
from paged.gateway.daemon import run_daemon
from paged.gateway.drain import DEFAULT_DRAIN_TIMEOUT_S
from paged.gateway.engine import AsyncEngine
from paged.gateway.http_listener import bind_http_listener
from paged.gateway.kv_store_lease import KVStoreLease
from paged.gateway.replica import WorkerSpec
from paged.gateway.worker_link import RegistrationError
from paged.gateway.worker_processes import RuntimeDir, local_workers
from paged.shared.cli_options import build_config, config_options, null_model_option
from paged.shared.config import CacheConfig, HttpConfig, KVSharingConfig, ModelConfig, SchedulerConfig, WorkerRole
from paged.shared.config_file import config_file_path
from paged.shared.logging import get_logger
from paged.shared.startup_failure import StartupError, check_model_directory, exit_on_startup_failure
from paged.shared.tokenizer import TokenizerLoadError, load_generation_defaults, load_tokenizer
from paged.shared.workers_layout import parse_workers_layout

F = TypeVar("F", bound=Callable[..., Any])

log = get_logger("gateway.cli")

# Which side takes which setting: a worker needs the model and the sizing of its page pool; the
# gateway needs the scheduler and the allocation rules, and learns the pool's size at registration.
GATEWAY_CACHE_FIELDS = ("block_size", "kv_allocator", "enable_prefix_caching", "kv_eviction_policy", "kv_store_eviction_policy")


def http_options(command: F) -> F:
    for option in reversed(
        [
            click.option("--host", default="127.0.0.1", show_default=True),
            click.option("--port", default=8000, show_default=True, type=int),
            click.option("--served-model-name", default=None, help="Model name in the API (default: the model directory's name)."),
            click.option("--api-key", default=None, envvar="PAGED_API_KEY", help="Require this Bearer token on /v1 (env PAGED_API_KEY)."),
            click.option("--registration-timeout", default=300.0, show_default=True, help="Seconds to wait for the workers to register."),
            click.option("--drain-timeout", default=DEFAULT_DRAIN_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0), help="On SIGTERM/SIGINT: seconds running requests may take to finish before they are aborted."),
            click.option("--admin-socket", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="PAGED_ADMIN_SOCKET", help="Admin API unix socket (env PAGED_ADMIN_SOCKET); one given that a live daemon serves refuses the start [default: the runtime directory's paged/admin.sock, skipped when in use]."),
            click.option("--admin-port", type=click.IntRange(1, 65535), default=None, help="Also serve the admin API on this loopback port (needs --admin-token)."),
            click.option("--admin-token", default=None, envvar="PAGED_ADMIN_TOKEN", help="Bearer token the admin port requires (env PAGED_ADMIN_TOKEN)."),
        ]
    ):
        command = option(command)
    return config_options(HttpConfig)(command)


class WorkersLayout(click.ParamType):
    """A workers layout (shared/workers_layout.py) as the roles it gives, checked where the config file is too."""

    name = "layout"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[WorkerRole]:
        if isinstance(value, list):
            return value
        try:
            return parse_workers_layout(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def workers_layout_option(help_text: str) -> Callable[[F], F]:
    return click.option("--workers-layout", "workers_layout", type=WorkersLayout(), default=None, help=help_text)


def _run_gateway(workers: list[WorkerSpec], model: str | None, cache_config: CacheConfig, kwargs: dict[str, Any]) -> None:
    setproctitle("paged-gateway")
    scheduler_config = build_config(SchedulerConfig, kwargs)
    try:
        admin = AdminSettings(kwargs["admin_socket"], kwargs["admin_port"], kwargs["admin_token"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with exit_on_startup_failure("gateway", StartupError, TokenizerLoadError, AdminSocketError), contextlib.ExitStack() as on_failure:
        check_model_directory(model)
        # Both listening addresses first: one in use fails the start at once, not after the model loaded.
        listener = bind_http_listener(kwargs["host"], kwargs["port"])
        on_failure.callback(listener.close)
        admin_listener = bind_admin_socket(admin)
        if admin_listener is not None:
            on_failure.callback(admin_listener.close)
        served_model_name = kwargs["served_model_name"] or (Path(model).name if model else "paged-builtin")
        host, port = listener.getsockname()[:2]
        log.info(
            "starting", progress=f"starting paged: {served_model_name}, {len(workers)} worker{'s' if len(workers) > 1 else ''}, HTTP on {host}:{port}",
            model=model or "builtin", workers=len(workers), host=host, port=port,
        )  # fmt: skip
        tokenizer = load_tokenizer(model)
        generation_defaults = load_generation_defaults(model)
        on_failure.pop_all()  # from here run_daemon closes them
    engine = AsyncEngine(workers, scheduler_config, cache_config, registration_timeout=kwargs["registration_timeout"])
    context = click.get_current_context()
    config_path = config_file_path(context)
    reload = ConfigReloader(context, config_path).reload if config_path else None
    with exit_on_startup_failure("gateway", StartupError, RegistrationError):
        uvloop.run(
            run_daemon(
                engine, tokenizer, served_model_name, listener, kwargs["api_key"], admin, admin_listener,
                drain_timeout=kwargs["drain_timeout"], reload=reload, http=build_config(HttpConfig, kwargs),
                generation_defaults=generation_defaults,
            )
        )  # fmt: skip


@click.command()
@config_options(ModelConfig)
@config_options(CacheConfig)
@config_options(SchedulerConfig)
@config_options(KVSharingConfig, only=("kv_offload_memory",))
@click.option("--kv-store-name", default=None, help="Name of the host KV store in /dev/shm [default: paged-kv-store-PORT].")
@click.option("--workers", "num_workers", type=click.IntRange(min=1), default=None, help="CPU worker processes [default: 1]; on GPU one per visible device.")
@workers_layout_option("The workers' roles, in order: 2 (two mixed), 1p1d (one prefill, one decode), 2p1d1m... (p prefill, d decode, m mixed) [default: every worker mixed]; sets the number of workers.")
@null_model_option
@http_options
def serve(
    num_workers: int | None, workers_layout: list[WorkerRole] | None, null_model: bool, kv_offload_memory: int, kv_store_name: str | None, **kwargs: Any
) -> None:
    """Run the gateway and spawn its workers (one per visible GPU, or --workers N on CPU), then serve HTTP.
    With --kv-offload-memory the workers share a host KV store for evicted prefix-cache blocks."""
    model_config = build_config(ModelConfig, kwargs)
    cache_config = build_config(CacheConfig, kwargs)
    root = click.get_current_context().find_root().params
    sharing = KVSharingConfig(kv_offload_memory=kv_offload_memory, kv_store_name=kv_store_name or f"paged-kv-store-{kwargs['port']}")
    store = KVStoreLease(sharing.kv_store_name) if kv_offload_memory else None
    runtime_dir = RuntimeDir()
    try:
        if store is not None:
            with exit_on_startup_failure("gateway", StartupError):
                store.acquire()
        workers = local_workers(
            runtime_dir, model_config, cache_config, kwargs["max_num_batched_tokens"],
            num_workers=num_workers, null_model=null_model, log_level=root["log_level"], log_json=root["log_json"],
            sharing=sharing, roles=workers_layout,
        )  # fmt: skip
        _run_gateway(workers, model_config.model, cache_config, kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        runtime_dir.close()
        if store is not None:
            store.release()


@click.command()
@click.option("--worker", "endpoints", multiple=True, required=True, help="A worker's endpoint (ipc://PATH or tcp://HOST:PORT); repeat per worker.")
@workers_layout_option("The --worker endpoints' roles, in order: 1p1d (the first prefill, the second decode), 2p1d... (p prefill, d decode, m mixed) [default: the role each worker registers with, its --role].")
@config_options(ModelConfig, only=("model",))
@config_options(CacheConfig, only=GATEWAY_CACHE_FIELDS)
@config_options(SchedulerConfig)
@http_options
def gateway(endpoints: tuple[str, ...], workers_layout: list[WorkerRole] | None, model: str | None, **kwargs: Any) -> None:
    """Run the gateway alone, connecting to workers started with `paged-worker` (split mode).
    --model names the directory to load the tokenizer from."""
    if workers_layout is not None and len(workers_layout) != len(endpoints):
        raise click.UsageError(f"--workers-layout has {len(workers_layout)} workers for {len(endpoints)} --worker endpoints")
    roles: list[WorkerRole | None] = list(workers_layout) if workers_layout else [None] * len(endpoints)
    specs = [WorkerSpec(endpoint, role=role) for endpoint, role in zip(endpoints, roles, strict=True)]
    _run_gateway(specs, model, build_config(CacheConfig, kwargs), kwargs)
