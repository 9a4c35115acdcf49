"""The scheduler and one worker in a single process: paged without the daemon, for `pagedd
generate`, offline benchmarks and end-to-end tests that want the real scheduling path without
processes or sockets. It drives the same step pipeline as the server (gateway/step_pipeline.py),
one step in flight: the worker runs each step before the next is scheduled, so overlapping would
only compute tokens a stop throws away. With `sharing.kv_offload_memory` the worker attaches a host
KV store and the scheduler saves evicted cached blocks to it and loads prefix hits from it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from paged.gateway.kv_store_index import KVStoreIndexes
from paged.gateway.outputs import RequestOutput
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.gateway.step_pipeline import LocalStepLoop
from paged.shared.config import CacheConfig, KVSharingConfig, ModelConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams
from paged.shared.tokenizer import Tokenizer, load_tokenizer
from paged.worker.worker import Worker


class OfflineEngine:
    def __init__(
        self,
        model_config: ModelConfig | None = None,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        sharing: KVSharingConfig | None = None,
    ) -> None:
        model_config = model_config or ModelConfig()
        cache_config = cache_config or CacheConfig()
        scheduler_config = scheduler_config or SchedulerConfig()
        self.tokenizer: Tokenizer = load_tokenizer(model_config.model)
        worker = self.worker = Worker(model_config, cache_config, scheduler_config.max_num_batched_tokens, sharing)
        store = KVStoreIndexes(cache_config.kv_store_eviction_policy).for_store(
            worker.kv_store_id, worker.num_store_slots, worker.page_bytes, worker.block_context_cost
        )
        self.scheduler = Scheduler(
            scheduler_config, cache_config, worker.num_blocks, worker.max_model_len, worker.num_host_blocks,
            store_index=store, context_cost=worker.block_context_cost,
        )  # fmt: skip
        self.loop = LocalStepLoop(self.scheduler, self.worker.execute_step, depth=1)
        self._request_ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.worker.max_model_len

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0, cache_salt: str | None = None
    ) -> str:
        """Queue a request (raises AdmissionError when refused) and return its id."""
        request_id = f"req-{next(self._request_ids)}"
        request = Request(
            request_id,
            list(prompt_token_ids),
            params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            priority=priority,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)
        return request_id

    def run(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding outputs as they come."""
        loop = self.loop
        while self.scheduler.needs_step() or loop.pipeline.num_in_flight:
            loop.step()
            yield from loop.outputs
            loop.outputs.clear()

    def close(self) -> None:
        """Unmap the KV store (the arena itself stays for whoever owns it)."""
        self.worker.close()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:
        """Token ids generated for each prompt, one list per sampled sequence (n of them)."""
        ids = [self.add_request(prompt, params) for prompt in prompts]
        tokens: dict[str, list[list[int]]] = {rid: [[] for _ in range(params.n)] for rid in ids}
        for output in self.run():
            if output.error:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
            for delta in output.deltas:
                tokens[output.request_id][delta.index].extend(delta.token_ids)
        return [tokens[rid] for rid in ids]

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt as the model expects it; an empty prompt is the BOS token alone."""
        ids = self.tokenizer.encode(text)
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return ids
