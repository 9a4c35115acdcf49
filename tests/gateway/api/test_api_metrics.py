"""/metrics in Prometheus text format, /v1/models and /health."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support.api_fixtures import MODEL, base_url, client, engine, story_ids, tokenizer  # noqa: F401
from support.fake_engine import FakeEngine

PER_WORKER = [
    "paged_requests_running", "paged_requests_waiting", "paged_kv_blocks_total", "paged_kv_blocks_used",
    "paged_kv_blocks_free", "paged_kv_blocks_cached", "paged_kv_utilization", "paged_prefix_cache_queries_tokens_total",
    "paged_prefix_cache_hits_tokens_total", "paged_preemptions_total", "paged_block_waits_total", "paged_evictions_total",
    "paged_swaps_out_total", "paged_swaps_in_total", "paged_computed_tokens_total", "paged_recomputed_tokens_total", "paged_kv_thrashing",
    "paged_goodput_ratio", "paged_preemptions_per_second", "paged_evictions_per_second", "paged_refetch_ratio", "paged_refetched_blocks_total", "paged_prefix_cache_hit_rate",
    "paged_admission_margin", "paged_expected_output_share",
]
REQUEST_METRICS = [
    "paged_requests_finished_total", "paged_prompt_tokens_total", "paged_generation_tokens_total",
    "paged_time_to_first_token_seconds_bucket", "paged_time_per_output_token_seconds_bucket",
    "paged_e2e_request_latency_seconds_bucket", "paged_request_queue_time_seconds_bucket",
]


async def scrape(client: httpx.AsyncClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


async def test_metrics_names_and_values(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "n": 2}
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    stopped = (await client.post("/v1/completions", json={**body, "max_tokens": 40, "stop": "little"})).json()
    assert [c["finish_reason"] for c in stopped["choices"]] == ["stop", "stop"]
    samples = await scrape(client)
    for name in PER_WORKER:
        assert name in samples, name
        assert [labels for labels, _ in samples[name]] == [{"worker": "0"}]
    for name in REQUEST_METRICS:
        assert name in samples, name
    assert samples["paged_kv_blocks_total"][0][1] == 64 and samples["paged_kv_blocks_used"][0][1] == 0
    assert samples["paged_prefix_cache_hits_tokens_total"][0][1] == 40
    # The thrash monitor's figures come from the worker's snapshot (the fake engine's: thrashing).
    assert samples["paged_kv_thrashing"][0][1] == 1 and samples["paged_goodput_ratio"][0][1] == 0.75
    assert samples["paged_recomputed_tokens_total"][0][1] == 250 and samples["paged_computed_tokens_total"][0][1] == 1000
    assert samples["paged_preemptions_per_second"][0][1] == 0.5 and samples["paged_evictions_per_second"][0][1] == 3.0
    finished = {labels["reason"]: value for labels, value in samples["paged_requests_finished_total"]}
    assert finished == {"length": 2, "stop": 2}
    assert samples["paged_generation_tokens_total"][0][1] == 8 + stopped["usage"]["completion_tokens"]
    ttft = {labels["le"]: value for labels, value in samples["paged_time_to_first_token_seconds_bucket"]}
    assert ttft["+Inf"] == 2
    assert samples["paged_e2e_request_latency_seconds_count"][0][1] == 2


async def test_kv_store_metrics_per_store(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    samples = await scrape(client)
    one = {name: value for name, pairs in samples.items() for labels, value in pairs if labels == {"store": "host"}}
    assert one["paged_kv_store_slots_total"] == 100 and one["paged_kv_store_capacity_bytes"] == 100 * 1024
    assert one["paged_kv_store_bytes"] == 40 * 1024  # slots not free
    assert (one["paged_kv_store_saves_total"], one["paged_kv_store_loads_total"], one["paged_kv_store_evictions_total"]) == (50, 12, 3)
    assert (one["paged_kv_store_failed_saves_total"], one["paged_kv_store_failed_loads_total"]) == (2, 1)
    slots = {labels["state"]: value for labels, value in samples["paged_kv_store_slots"]}
    assert slots == {"free": 60, "saving": 2, "ready": 38, "pinned": 1, "quarantined": 0}
    load = {labels["le"]: value for labels, value in samples["paged_kv_store_load_seconds_bucket"]}
    assert load["0.0001"] == 0 and load["0.0003"] == 1 and load["+Inf"] == 1
    assert samples["paged_kv_store_load_seconds_count"][0][1] == 1
    assert samples["paged_kv_store_hits_tokens_total"][0][0] == {"worker": "0"}


async def test_models(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["owned_by"] == "paged"
    assert isinstance(model["created"], int) and model["max_model_len"] == engine.max_model_len


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ready"


async def test_generated_tokens_count_while_they_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """`pagedctl top`'s tokens/s reads this counter: it must move while a long request streams, not at its end."""
    engine.step_delay_s = 0.02
    received = 0
    body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            received += line.startswith("data: {")
            if received == 5:
                break
        counted = (await scrape(client))["paged_generation_tokens_total"][0][1]
    assert counted >= 5 and not engine.completed


def test_role_and_kv_transfer_metrics() -> None:
    """Per-role load sums the workers of each role; the transfer counters and the latency histogram
    come from the engine's hand-off statistics."""
    from prometheus_client import generate_latest

    from paged.gateway.api.metrics import Metrics
    from paged.gateway.stats import TransferStats, WorkerStats
    from support.fake_engine import cycling_script

    class TwoRoles(FakeEngine):
        def worker_stats(self) -> list[WorkerStats]:
            return [
                WorkerStats(name="0", state="ready", endpoint="a", role="prefill", num_blocks=64, used_blocks=10, running_requests=1),
                WorkerStats(name="1", state="ready", endpoint="b", role="decode", num_blocks=64, used_blocks=30, running_requests=7),
                WorkerStats(name="2", state="registering", endpoint="c", role="decode", num_blocks=64, waiting_requests=2),
            ]

        def transfer_stats(self) -> TransferStats:
            stats = TransferStats(in_flight=1, started=9, completed=7, cancelled=1, failures={"failed": 1}, blocks=70, bytes=70 * 4096)
            for seconds in (0.002, 0.004, 0.3):
                stats.latency.observe(seconds)
            return stats

    text = generate_latest(Metrics(TwoRoles(cycling_script([5]))).registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("paged_role_workers", (("role", "decode"),))] == 1  # the registering one is not ready
    assert samples[("paged_role_requests_running", (("role", "decode"),))] == 7
    assert samples[("paged_role_requests_waiting", (("role", "decode"),))] == 2
    assert samples[("paged_role_kv_blocks_used", (("role", "prefill"),))] == 10
    assert samples[("paged_kv_transfers_in_flight", ())] == 1
    assert samples[("paged_kv_transfers_completed_total", ())] == 7
    assert samples[("paged_kv_transfer_bytes_total", ())] == 70 * 4096
    assert samples[("paged_kv_transfer_failures_total", (("reason", "failed"),))] == 1
    assert samples[("paged_kv_transfer_seconds_bucket", (("le", "0.005"),))] == 2
    assert samples[("paged_kv_transfer_seconds_bucket", (("le", "+Inf"),))] == 3
    assert abs(samples[("paged_kv_transfer_seconds_sum", ())] - 0.306) < 1e-9
