"""Worker processes sharing KV, driven by a stand-in gateway over the real links: registration says
each worker's role, transfer endpoint and KV store; a sequence prefilled in one worker process and
decoded in another matches one process doing both; a peer killed -9 while a transfer is in flight
fails that transfer on the survivor, which serves on; a new gateway session cancels the transfers of
the old one, so none of them reports into (or writes into blocks of) the new session."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

from paged.gateway.worker_link import WorkerLink
from paged.gateway.worker_processes import RuntimeDir
from paged.shared.protocol import KVReceive, KVSend, NewSequence, ScheduledSeq, StepInput, StepOutput
from paged.shared.sampling_params import SamplingParams
from paged.worker.kv_store import SHM_DIR

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
BLOCK_SIZE = 16


def start_worker(endpoint: str, *extra: str) -> subprocess.Popen[bytes]:
    """A `paged-worker` process with the built-in model (a real forward pass, real KV pages)."""
    command = [
        sys.executable, "-m", "paged.worker.cli", "--log-json", "--endpoint", endpoint,
        "--device", "cpu", "--cpu-threads", "1", "--kv-cache-memory", "4MiB", "--swap-space", "0", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=PROJECT_ROOT, stderr=subprocess.DEVNULL)


class Gateway:
    """A stand-in for the gateway: one link per worker, numbered steps, transfer outcomes collected."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, name: str) -> None:
        self.link = WorkerLink(context, endpoint, name=name, gateway_id=f"test-{uuid.uuid4().hex[:6]}")
        self.step_id = 0
        self.done: set[int] = set()
        self.failed: dict[int, str] = {}

    async def step(self, **items: object) -> StepOutput:
        await self.link.send_step(StepInput(self.step_id, **items))  # type: ignore[arg-type]
        self.step_id += 1
        output = await asyncio.wait_for(self.link.receive(), 30)
        assert not output.errors, output.errors
        self.done.update(output.transfers_done)
        self.failed.update((f.transfer_id, f.reason) for f in output.transfers_failed)
        return output

    async def wait_transfer(self, transfer_id: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while transfer_id not in self.done | set(self.failed):
            assert time.monotonic() < deadline, f"transfer {transfer_id} never ended"
            await self.step(transfer_wait_s=0.2)

    async def decode(self, seq_id: int, num_tokens: int, table: list[int], next_block: int, count: int, known: int | None = None) -> list[int]:
        """Decode `count` tokens; the first `num_tokens - 1` tokens are in the cache. The worker knows
        the first `known` entries of `table` (default: all); the first step sends the rest."""
        tokens = []
        known = len(table) if known is None else known
        for _ in range(count):
            position = num_tokens - 1
            new_blocks = [next_block + len(table)] if position // BLOCK_SIZE == len(table) else []
            output = await self.step(scheduled=[ScheduledSeq(seq_id, position, 1, known, table[known:] + new_blocks)])
            table = table + new_blocks
            known = len(table)
            tokens.append(output.results[0].token_id)
            num_tokens += 1
        return tokens


@contextlib.asynccontextmanager
async def workers(*extra_args: tuple[str, ...]) -> AsyncIterator[tuple[list[subprocess.Popen[bytes]], list[Gateway]]]:
    """One worker process per argument tuple, each registered with its own stand-in gateway."""
    runtime = RuntimeDir()
    context = zmq.asyncio.Context()
    endpoints = [runtime.endpoint(f"w{index}.sock") for index in range(len(extra_args))]
    processes = [start_worker(endpoint, *extra) for endpoint, extra in zip(endpoints, extra_args)]
    gateways = [Gateway(context, endpoint, f"w{index}") for index, endpoint in enumerate(endpoints)]
    try:
        for gateway in gateways:
            await gateway.link.register(timeout=120)
        yield processes, gateways
    finally:
        for gateway in gateways:
            await gateway.link.close()
        for process in processes:
            process.kill()
            process.wait(10)
        context.term()
        runtime.close()


def prompt_of(length: int) -> list[int]:
    return [1, *((7 * i) % 200 + 3 for i in range(length - 1))]


async def test_prefill_in_one_process_decode_in_another() -> None:
    store_name = f"paged-test-{uuid.uuid4().hex[:12]}"
    try:
        async with workers(("--role", "prefill"), ("--role", "decode", "--kv-offload-memory", "1MiB", "--kv-store-name", store_name)) as (_, (prefill, decode)):
            p, d = prefill.link.registration, decode.link.registration
            assert p is not None and d is not None
            assert (p.role, d.role) == ("prefill", "decode")
            assert p.transfer_endpoint == prefill.link.endpoint.removesuffix(".sock") + "-kv.sock"
            assert (p.kv_store_id, p.num_store_slots) == ("", 0)
            assert d.kv_store_id and d.num_store_slots == (1 << 20) // (2 * 4 * BLOCK_SIZE * 4 * 8 * 4)

            prompt = prompt_of(70)  # four full blocks and a partial one
            table = [10, 11, 12, 13, 14]
            # Reference: everything on the prefill worker.
            output = await prefill.step(new_seqs=[NewSequence(1, prompt, GREEDY)], scheduled=[ScheduledSeq(1, 0, 70, 0, table)])
            expected = [output.results[0].token_id, *await prefill.decode(1, 71, table, 20, 10)]
            await prefill.step(freed_seq_ids=[1])

            # Disaggregated: the receive is ordered first, the send rides on the prefill step.
            await decode.step(kv_receives=[KVReceive(1, [30, 31, 32, 33, 34])])
            output = await prefill.step(
                new_seqs=[NewSequence(2, prompt, GREEDY)],
                scheduled=[ScheduledSeq(2, 0, 70, 0, table)],
                kv_sends=[KVSend(1, 2, d.transfer_endpoint, table)],
            )
            first = output.results[0].token_id
            await decode.wait_transfer(1)
            await prefill.wait_transfer(1)
            assert (decode.done, prefill.done) == ({1}, {1})
            await prefill.step(freed_seq_ids=[2])
            await decode.step(new_seqs=[NewSequence(2, [*prompt, first], GREEDY, 1)])
            assert [first, *await decode.decode(2, 71, [30, 31, 32, 33, 34], 40, 10, known=0)] == expected
    finally:
        (SHM_DIR / store_name).unlink(missing_ok=True)


@pytest.mark.parametrize("killed", ["receiver", "sender"])
async def test_a_peer_killed_mid_transfer_fails_it_and_the_survivor_serves_on(killed: str) -> None:
    timeout = ("--kv-transfer-timeout", "1")
    async with workers(timeout, timeout) as (processes, (sender, receiver)):
        assert sender.link.registration is not None and receiver.link.registration is not None
        peer = receiver.link.registration.transfer_endpoint
        if killed == "receiver":
            await receiver.step(kv_receives=[KVReceive(3, [0, 1])])
            processes[1].send_signal(signal.SIGKILL)
            processes[1].wait(10)
            await sender.step(new_seqs=[NewSequence(1, prompt_of(20), GREEDY)], scheduled=[ScheduledSeq(1, 0, 20, 0, [4, 5])], kv_sends=[KVSend(3, 1, peer, [4, 5])])
            survivor = sender
        else:
            await receiver.step(kv_receives=[KVReceive(3, [0, 1])])
            processes[0].send_signal(signal.SIGKILL)  # dies before it could send
            processes[0].wait(10)
            survivor = receiver
        await survivor.wait_transfer(3)
        assert 3 in survivor.failed and 3 not in survivor.done
        output = await survivor.step(new_seqs=[NewSequence(9, [1, 2, 3], GREEDY)], scheduled=[ScheduledSeq(9, 0, 3, 0, [7])])
        assert [result.seq_id for result in output.results] == [9]


async def test_a_new_session_cancels_the_transfers_of_the_old_one() -> None:
    args = ("--kv-transfer-timeout", "2", "--on-gateway-loss", "wait", "--gateway-timeout", "0.5")
    async with workers(args) as (_, gateways):
        first = gateways[0]
        await first.step(kv_receives=[KVReceive(4, [0, 1])])  # its sender never comes
        registered = time.monotonic()
        await first.link._end_session()  # this gateway vanishes
        await asyncio.sleep(0.8)  # the worker notices (0.5 s) while transfer 4 is still waiting
        second = gateways[0] = Gateway(first.link.context, first.link.endpoint, "w0-again")
        await second.link.register(timeout=10)
        assert time.monotonic() - registered < 2, "too slow to catch transfer 4 alive"
        while time.monotonic() < registered + 3:  # past its stall timeout: alive, it would have failed
            await second.step(transfer_wait_s=0.1)
        assert second.done == set() and second.failed == {}
