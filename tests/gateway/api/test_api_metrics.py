"""/metrics in Prometheus text format, /v1/models and /health."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support.api_fixtures import MODEL, base_url, client, engine, story_ids, tokenizer  # noqa: F401
from support.fake_engine import FakeEngine

PER_WORKER = [
    "paged_requests_running", "paged_requests_waiting", "paged_kv_blocks_total", "paged_kv_blocks_used",
    "paged_kv_blocks_free", "paged_kv_blocks_cached", "paged_kv_utilization", "paged_prefix_cache_queries_tokens_total",
    "paged_prefix_cache_hits_tokens_total", "paged_preemptions_total", "paged_evictions_total", "paged_swaps_out_total",
    "paged_swaps_in_total", "paged_computed_tokens_total", "paged_recomputed_tokens_total", "paged_kv_thrashing",
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
