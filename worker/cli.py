"""The worker's command line: `paged-worker` (and `pagedd worker`, the same command inside the
daemon's CLI, where `pagedd --config FILE` sets its options from the file's [worker] table).

A worker takes the model and the sizing of its page pool; the gateway takes the scheduling and
allocation rules and learns the pool's size when the worker registers."""

from __future__ import annotations

from typing import Any

import click

from paged.shared.cli_options import build_config, config_options, log_json_option, log_level_option, null_model_option
from paged.shared.config import CacheConfig, KVSharingConfig, ModelConfig, SchedulerConfig
from paged.shared.logging import configure_logging
from paged.worker.server import run_worker
from paged.worker.session_io import GATEWAY_TIMEOUT_S, GatewayLossPolicy

WORKER_CACHE_FIELDS = ("block_size", "kv_cache_memory", "gpu_memory_utilization", "swap_space")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--endpoint", required=True, help="Where to listen for the gateway: ipc://PATH or tcp://HOST:PORT (tcp://*:PORT for all interfaces).")
@config_options(ModelConfig)
@config_options(CacheConfig, only=WORKER_CACHE_FIELDS)
@config_options(SchedulerConfig, only=("max_num_batched_tokens",))
@config_options(KVSharingConfig)
@null_model_option
@click.option("--worker-id", default=None, help="Name in the gateway's logs and in `ps` [default: HOST:PID].")
@click.option("--on-gateway-loss", type=click.Choice(["exit", "wait"]), default="exit", show_default=True, help="When the gateway's heartbeats stop: exit, or free everything and wait for a gateway.")
@click.option("--gateway-timeout", default=GATEWAY_TIMEOUT_S, show_default=True, help="Seconds without a word from the gateway before it counts as lost.")
def worker(endpoint: str, null_model: bool, worker_id: str | None, on_gateway_loss: GatewayLossPolicy, gateway_timeout: float, **kwargs: Any) -> None:
    """Run one worker process (split mode): load the model, listen on --endpoint, serve one gateway."""
    run_worker(
        endpoint, build_config(ModelConfig, kwargs), build_config(CacheConfig, kwargs), kwargs["max_num_batched_tokens"],
        null_model=null_model, sharing=build_config(KVSharingConfig, kwargs), worker_id=worker_id, on_gateway_loss=on_gateway_loss, gateway_timeout=gateway_timeout,
    )  # fmt: skip


def main() -> None:
    """`paged-worker`: the worker command on its own, with the logging options `pagedd` takes."""

    def run(log_level: str, log_json: bool | None, **kwargs: Any) -> None:
        configure_logging(log_level, json=log_json)
        assert worker.callback is not None
        worker.callback(**kwargs)

    standalone = click.Command(
        "paged-worker", callback=run, params=list(worker.params), help=worker.help, context_settings=worker.context_settings
    )
    standalone = log_level_option(log_json_option(standalone))
    standalone(prog_name="paged-worker")


if __name__ == "__main__":
    main()
