"""`pagedd generate`: the engine in-process on one prompt (ops/offline_engine.py), a debugging tool."""

from __future__ import annotations

from typing import Any

import click

from paged.shared.cli_options import build_config, config_options
from paged.shared.config import CacheConfig, ModelConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams
from paged.shared.tokenizer import load_generation_defaults


def _pick(given: Any, checkpoint: Any, ours: Any) -> Any:
    """A sampling value as the API resolves it: the one asked for, else the checkpoint's, else ours."""
    return given if given is not None else checkpoint if checkpoint is not None else ours


@click.command()
@config_options(ModelConfig, only=("model", "dtype", "device", "attention_backend", "max_model_len"))
@click.option("--prompt", default="", show_default=True, help="Text to continue; empty starts from the BOS token alone.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=None, type=click.FloatRange(min=0.0), help="[default: the checkpoint's, else 0: greedy]")
@click.option("--top-p", default=None, type=click.FloatRange(0.0, 1.0, min_open=True), help="[default: the checkpoint's, else 1]")
@click.option("--top-k", default=None, type=click.IntRange(min=0), help="[default: the checkpoint's, else 0: off]")
@click.option("--seed", "sampling_seed", default=None, type=int, help="Sampling seed: same seed, same output.")
@click.option("--n", default=1, show_default=True, type=click.IntRange(1, 16), help="Continuations to sample (share the prompt's blocks).")
def generate(
    prompt: str, max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None, sampling_seed: int | None, n: int, **kwargs: Any
) -> None:
    """Run the engine in-process on one prompt and print the continuation (a debugging tool)."""
    from paged.ops.offline_engine import OfflineEngine  # imports torch: only this command needs it

    model_config = build_config(ModelConfig, kwargs)
    defaults = load_generation_defaults(model_config.model)
    engine = OfflineEngine(model_config, CacheConfig(), SchedulerConfig())
    params = SamplingParams(
        temperature=_pick(temperature, defaults.temperature, 0.0),
        top_p=_pick(top_p, defaults.top_p, 1.0),
        top_k=_pick(top_k, defaults.top_k, 0),
        seed=sampling_seed,
        max_tokens=max_tokens,
        n=n,
    )
    continuations = engine.generate([engine.encode_prompt(prompt)], params)[0]
    for index, token_ids in enumerate(continuations):
        if n > 1:
            click.echo(f"--- {index}")
        click.echo(prompt + engine.tokenizer.decode(token_ids))
