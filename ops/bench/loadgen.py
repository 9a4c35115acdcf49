"""The load generator: streams /v1/completions requests, open loop (Poisson arrivals at a rate) or closed
loop (a fixed number in flight), and times every token from the arrival of its SSE chunk."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from paged.ops.bench.results import RequestResult
from paged.ops.bench.server_metrics import MetricsSampler, ServerStats
from paged.ops.bench.workloads import RequestSpec, arrival_times


@dataclass(frozen=True)
class LoadShape:
    request_rate: float = float("inf")  # open loop: Poisson arrivals at this rate
    concurrency: int | None = None  # closed loop: this many in flight, the next sent as one finishes
    seed: int = 0
    stall_timeout: float = 300.0  # a request that receives nothing for this long fails (a stuck server ends the run)


def _request_body(model: str, spec: RequestSpec, cache_salt: str) -> dict:
    return {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "n": spec.n,
        "temperature": 1.0,  # sampling, so the n choices of a parallel request diverge
        "ignore_eos": True,  # lengths fixed by max_tokens, the same for every system compared
        "stream": True,
        "stream_options": {"include_usage": True},
        # A salt per run: requests of one run share cached prefixes, but a run never reuses blocks
        # cached by an earlier run on the same server (the same seed makes the same prompts).
        "cache_salt": cache_salt,
    }


def _error_reason(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    return f"HTTP {status}: {message[:120]}"


def _is_token_chunk(choice: dict) -> bool:
    # A chunk with text carries tokens; an empty one does too when the detokenizer held bytes back,
    # except the terminating chunk that only carries finish_reason.
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream. Not httpx's aiter_lines: it splits like str.splitlines, also at
    U+0085, U+2028 and U+2029, which JSON carries unescaped inside a chunk's text."""
    pending = ""
    async for text in response.aiter_text():
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec,
                            cache_salt: str) -> RequestResult:
    """Send one streaming request; every outcome, including errors, comes back as a RequestResult."""
    start = time.perf_counter()
    result = RequestResult(outcome="failed", prompt_tokens=len(spec.prompt), kind=spec.kind)
    token_times: dict[int, list[float]] = defaultdict(list)
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=_request_body(model, spec, cache_salt)) as response:
            if response.status_code != 200:
                result.outcome, result.reason = "rejected", _error_reason(response.status_code, await response.aread())
                return result
            finished = False
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    finished = True
                    break
                now = time.perf_counter()
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.reason = f"stream error: {str(chunk['error'].get('message', chunk['error']))[:120]}"
                    return result
                for choice in chunk.get("choices") or []:
                    if _is_token_chunk(choice):
                        token_times[choice.get("index", 0)].append(now)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
            if not finished:
                result.reason = "stream ended without [DONE]"
                return result
    except (httpx.HTTPError, ValueError) as error:  # ValueError: a chunk that is not JSON
        result.reason = ": ".join(filter(None, [type(error).__name__, str(error)[:120]]))
        return result
    if not token_times:
        result.reason = "no tokens received"
        return result
    end = max(times[-1] for times in token_times.values())
    result.outcome = "completed"
    result.output_tokens = usage_tokens if usage_tokens is not None else sum(map(len, token_times.values()))
    result.ttft = min(times[0] for times in token_times.values()) - start
    result.latency = end - start
    result.itls = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    per_choice = result.output_tokens / max(1, len(token_times))
    if per_choice > 1:
        result.tpot = (result.latency - result.ttft) / (per_choice - 1)
    return result


def _progress(description: str) -> Progress:
    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn()
    )


async def _run(url: str, model: str, specs: list[RequestSpec], shape: LoadShape, description: str,
               metrics_interval: float) -> tuple[list[RequestResult], float, ServerStats]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(shape.stall_timeout, connect=30, pool=None)
    results: list[RequestResult | None] = [None] * len(specs)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        sampler = MetricsSampler(client, url, metrics_interval)
        await sampler.start()
        with _progress(description) as progress:
            task = progress.add_task(description, total=len(specs), status="")
            cache_salt = uuid.uuid4().hex
            t0 = time.perf_counter()

            errors = 0

            async def one(index: int) -> None:
                nonlocal errors
                results[index] = result = await stream_completion(client, url, model, specs[index], cache_salt)
                errors += result.outcome != "completed"
                progress.update(task, advance=1, status=f"errors {errors}" if errors else "")

            if shape.concurrency:
                queue = iter(range(len(specs)))

                async def closed_loop_worker() -> None:
                    for index in queue:  # a shared iterator: each worker takes the next request
                        await one(index)

                await asyncio.gather(*(closed_loop_worker() for _ in range(shape.concurrency)))
            else:
                pending = []
                for index, arrival in enumerate(arrival_times(len(specs), shape.request_rate, shape.seed)):
                    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
                    pending.append(asyncio.create_task(one(index)))
                await asyncio.gather(*pending)
            duration = time.perf_counter() - t0
        server = await sampler.stop()
    return [r for r in results if r is not None], duration, server


def run_load(url: str, model: str, specs: list[RequestSpec], shape: LoadShape, description: str = "bench",
             metrics_interval: float = 0.25) -> tuple[list[RequestResult], float, ServerStats]:
    """Run the workload against `url`; returns every request's result, the run's duration and server figures."""
    return asyncio.run(_run(url.rstrip("/"), model, specs, shape, description, metrics_interval))


def warm_up(url: str, model: str, spec: RequestSpec) -> RequestResult:
    """One short request before measuring, so first-call costs (allocation, compilation) stay off the clock."""
    async def send() -> RequestResult:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as client:
            return await stream_completion(client, url.rstrip("/"), model, spec, uuid.uuid4().hex)
    return asyncio.run(send())
