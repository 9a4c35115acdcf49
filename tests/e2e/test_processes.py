"""The gateway and its workers as real processes over ipc: round trips, routing, failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from paged.gateway.engine import AsyncEngine
from paged.gateway.replica import WorkerSpec
from paged.gateway.engine_client import AdmissionError, Refusal
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.gateway.step_pipeline import LocalStepLoop
from paged.gateway.worker_link import RegistrationError, WorkerLink
from paged.gateway.worker_processes import RuntimeDir
from paged.ops.bench.servers import free_port
from paged.shared.config import MiB, CacheConfig, ModelConfig, SchedulerConfig
from paged.shared.protocol import (
    PROTOCOL_VERSION,
    Codec,
    Hello,
    NewSequence,
    ScheduledSeq,
    StepInput,
    WorkerRegistration,
)
from paged.shared.sampling_params import SamplingParams
from paged.worker.null_worker import NULL_VOCAB_SIZE
from support.engine_processes import EOS, generate, running_engine, start_split_worker, used_blocks, wait_for

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --- round trips --------------------------------------------------------------------------------


async def test_round_trip_null_worker() -> None:
    async with running_engine() as engine:
        outputs = [output async for output in engine.generate("q", [1, 2, 3], SamplingParams(max_tokens=3), eos_token_ids=EOS)]
        assert outputs[0].queue_s is not None and outputs[0].queue_s >= 0
        assert all(output.queue_s is None for output in outputs[1:]) and outputs[-1].finished
        results = await asyncio.gather(*(generate(engine, f"r{i}", [1, 10 + i, 20, 30], 12) for i in range(3)))
        for tokens, finish, error in results:
            assert error is None and finish == "length" and len(tokens) == 12
            assert all(3 <= t < NULL_VOCAB_SIZE for t in tokens)
        assert len({tuple(tokens) for tokens, _, _ in results}) == 3  # each sequence its own stream
        assert used_blocks(engine) == {"0": 0}


async def test_round_trip_real_model_matches_in_process(stories_dir: Path) -> None:
    """Greedy stories260K through gateway -> worker process -> gateway equals the same scheduler
    driving the same Worker in-process."""
    from paged.worker.worker import Worker

    model_config = ModelConfig(model=str(stories_dir), device="cpu")
    cache_config = CacheConfig(kv_cache_memory=4 * MiB, swap_space=0)
    prompts = [[1, 403, 407, 261, 378], [1, 9, 20, 300, 301, 302, 303, 400, 401]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    worker = Worker(model_config, cache_config, 2048)
    scheduler = Scheduler(SchedulerConfig(), cache_config, worker.num_blocks, worker.max_model_len)
    expected: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        scheduler.add_request(Request(f"r{i}", prompt, params, EOS))
        expected[f"r{i}"] = []
    loop = LocalStepLoop(scheduler, worker.execute_step, depth=1)
    loop.run()
    for output in loop.outputs:
        for delta in output.deltas:
            expected[output.request_id] += delta.token_ids

    async with running_engine(model_config=model_config, cache_config=cache_config, null_model=False) as engine:
        results = await asyncio.gather(*(generate(engine, f"r{i}", p, 40, temperature=0.0) for i, p in enumerate(prompts)))
    for i, (tokens, finish, error) in enumerate(results):
        assert error is None and finish == "length"
        assert tokens == expected[f"r{i}"]


# --- several workers ----------------------------------------------------------------------------


async def test_two_workers_prefix_affinity() -> None:
    shared_prefix = list(range(3, 3 + 64))  # four full blocks of 16
    async with running_engine(2, null_step_s=0.005) as engine:
        _, _, error = await generate(engine, "warm", shared_prefix + [100], 4)
        assert error is None
        warm_worker = next(m.name for m in engine.worker_stats() if m.cached_blocks > 0)
        # The same prefix follows the cache; unrelated prompts go to the less loaded worker.
        tasks = [asyncio.create_task(generate(engine, f"p{i}", shared_prefix + [110 + i], 30)) for i in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(generate(engine, f"u{i}", [200 + i, 201, 202], 30)) for i in range(4)]
        await wait_for(lambda: all(engine.worker_of(f"{k}{i}") for k in "pu" for i in range(4)))
        placement = {rid: engine.worker_of(rid) for rid in (f"{k}{i}" for k in "pu" for i in range(4))}
        busy = {m.name: m.running_requests + m.waiting_requests for m in engine.worker_stats()}
        results = await asyncio.gather(*tasks)
        assert all(error is None and len(tokens) == 30 for tokens, _, error in results)
        other = "1" if warm_worker == "0" else "0"
        assert all(placement[f"p{i}"] == warm_worker for i in range(4)), placement
        assert all(placement[f"u{i}"] == other for i in range(4)), placement
        assert all(busy.values()), busy  # both workers served at once
        hits = {m.name: m.prefix_hits_tokens for m in engine.worker_stats()}
        assert hits[warm_worker] >= 4 * 64 and hits[other] == 0
        assert used_blocks(engine) == {"0": 0, "1": 0}


async def streams_until_started(engine: AsyncEngine, count: int, max_tokens: int) -> tuple[list[asyncio.Task], dict[str, list[int]]]:
    progress: dict[str, list[int]] = {f"s{i}": [] for i in range(count)}

    async def stream(request_id: str) -> tuple[list[int], str | None, str | None]:
        finish = error = None
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for output in engine.generate(request_id, [1, 50 + int(request_id[1:]), 7, 8, 9], sampling, eos_token_ids=EOS):
            error = output.error or error
            for delta in output.deltas:
                progress[request_id] += delta.token_ids
                finish = delta.finish_reason or finish
        return progress[request_id], finish, error

    tasks = [asyncio.create_task(stream(rid)) for rid in progress]
    await wait_for(lambda: all(len(tokens) >= 3 for tokens in progress.values()))
    return tasks, progress


async def test_kill_worker_mid_stream_requests_finish_on_the_other() -> None:
    async with running_engine(2, null_step_s=0.02) as engine:
        tasks, _ = await streams_until_started(engine, 20, 60)
        victim = engine.replicas[0]
        on_victim = [rid for rid in (f"s{i}" for i in range(20)) if engine.worker_of(rid) == "0"]
        assert on_victim
        killed_at = time.monotonic()
        os.kill(victim.link.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await wait_for(lambda: victim.scheduler is None, timeout=5)
        detected_s = time.monotonic() - killed_at
        results = await asyncio.gather(*tasks)
        for tokens, finish, error in results:
            assert error is None and finish == "length" and len(tokens) == 60
        assert detected_s < 2.0
        # The killed worker is respawned and rejoins with a fresh, empty page pool.
        await wait_for(lambda: victim.ready, timeout=30)
        assert used_blocks(engine) == {"0": 0, "1": 0}


async def test_kill_only_worker_fails_requests_cleanly() -> None:
    async with running_engine(1, null_step_s=0.02) as engine:
        tasks, _ = await streams_until_started(engine, 20, 200)
        os.kill(engine.replicas[0].link.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        results = await asyncio.gather(*tasks)
        for tokens, finish, error in results:
            assert error is not None and "worker 0 was lost" in error and "no worker is ready" in error
            assert finish is None and len(tokens) < 200
        with pytest.raises(AdmissionError) as refused:
            await generate(engine, "late", [1, 2, 3], 5)
        assert refused.value.kind is Refusal.UNAVAILABLE
        await wait_for(lambda: engine.is_ready(), timeout=30)  # respawned: serving again
        assert (await generate(engine, "after", [1, 2, 3], 5))[2] is None
        assert used_blocks(engine) == {"0": 0}


async def test_hung_worker_detected_by_heartbeat_and_taken_back() -> None:
    runtime = RuntimeDir()
    endpoint = runtime.endpoint("split.sock")
    process = start_split_worker(endpoint)
    engine = AsyncEngine([WorkerSpec(endpoint)], SchedulerConfig(), CacheConfig(), registration_timeout=60)
    try:
        await engine.start()
        replica = engine.replicas[0]
        process.send_signal(signal.SIGSTOP)  # alive but silent: only heartbeats can tell
        stopped_at = time.monotonic()
        await wait_for(lambda: replica.scheduler is None, timeout=10)
        detected_s = time.monotonic() - stopped_at
        assert not engine.is_ready()
        process.send_signal(signal.SIGCONT)
        await wait_for(lambda: replica.ready, timeout=10)
        assert (await generate(engine, "back", [1, 2, 3], 5))[2] is None
        assert detected_s < 2.5  # 2 s by design (1.5 s of silence + one 0.25 s check); slack for a loaded host
    finally:
        await engine.shutdown()
        process.wait(10)
        runtime.close()


# --- bad input on the wire ----------------------------------------------------------------------


async def test_garbage_on_the_worker_socket_is_dropped() -> None:
    async with running_engine() as engine:
        context = zmq.asyncio.Context()
        rogue = context.socket(zmq.DEALER)
        rogue.connect(engine.replicas[0].spec.endpoint)
        codec = Codec()
        step = StepInput(0, scheduled=[ScheduledSeq(1, 0, 1)], new_seqs=[NewSequence(1, [1], SamplingParams())])
        for frames in (
            [b"\xff" * 37],
            [b"\x01", b"\x02", b"\x03"],
            [bytes((PROTOCOL_VERSION, 7)), b"not msgpack at all"],
            [bytes((PROTOCOL_VERSION, 250)), b""],
            [bytes((PROTOCOL_VERSION + 1, 1)), b"future"],
            codec.encode(step),  # well-formed, but from a peer the worker does not serve
            codec.encode(Hello(PROTOCOL_VERSION, "intruder")),  # the worker already serves a gateway
        ):
            await rogue.send_multipart(frames)
        assert not await rogue.poll(300)  # nothing answered
        rogue.close(0)
        context.term()
        tokens, finish, error = await generate(engine, "after-garbage", [1, 2, 3], 8)
        assert error is None and len(tokens) == 8
        assert engine.replicas[0].link.process.exitcode is None  # type: ignore[union-attr]


async def test_link_drops_garbage_and_refuses_other_protocol_versions() -> None:
    """A fake worker: garbage before its registration is ignored; a wrong version is refused."""
    context = zmq.asyncio.Context()
    fake = context.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    codec = Codec()
    registration = WorkerRegistration(PROTOCOL_VERSION, "fake", 64, 0, 16, 256, "null", "cpu", "float32", os.getpid())
    seen_peers: set[bytes] = set()

    async def fake_worker(version_header: int) -> None:
        while True:  # skip what the previous session left behind (repeated hellos, ack, shutdown)
            peer, *frames = await fake.recv_multipart()
            if isinstance(codec.decode(frames), Hello) and peer not in seen_peers:
                break
        seen_peers.add(peer)
        await fake.send_multipart([peer, b"junk"])
        await fake.send_multipart([peer, bytes((PROTOCOL_VERSION, 8)), b"\x00\x01"])
        header, payload = codec.encode(registration)
        await fake.send_multipart([peer, bytes((version_header, header[1])), payload])

    try:
        link = WorkerLink(context, f"tcp://127.0.0.1:{port}", name="fake", gateway_id="test")
        serving = asyncio.create_task(fake_worker(PROTOCOL_VERSION))
        assert await link.register(timeout=5) == registration
        await serving
        await link.close()

        link = WorkerLink(context, f"tcp://127.0.0.1:{port}", name="fake", gateway_id="test")
        serving = asyncio.create_task(fake_worker(PROTOCOL_VERSION + 1))
        with pytest.raises(RegistrationError, match="protocol version"):
            await link.register(timeout=5)
        await serving
    finally:
        fake.close(0)
        context.term()


async def test_worker_error_fails_only_the_affected_request() -> None:
    async with running_engine() as engine:
        good, bad = await asyncio.gather(
            generate(engine, "good", [1, 2, 3], 10), generate(engine, "bad", [1, NULL_VOCAB_SIZE + 5], 10)
        )
        assert good[2] is None and len(good[0]) == 10
        assert bad[2] is not None and "token ids" in bad[2]
        assert used_blocks(engine) == {"0": 0}


# --- aborts and draining ------------------------------------------------------------------------


async def test_closing_the_stream_aborts_and_frees_blocks() -> None:
    async with running_engine(null_step_s=0.01) as engine:
        stream = engine.generate("long", list(range(3, 200)), SamplingParams(max_tokens=2000, ignore_eos=True), eos_token_ids=EOS)
        await anext(stream)
        assert used_blocks(engine)["0"] > 0
        await stream.aclose()
        assert used_blocks(engine) == {"0": 0}  # freed at once in the gateway; the worker hears next step
        assert engine.worker_of("long") is None


async def test_drain_refuses_new_requests_and_finishes_running_ones() -> None:
    async with running_engine(null_step_s=0.005) as engine:
        running = asyncio.create_task(generate(engine, "running", [1, 2, 3], 40))
        await wait_for(lambda: engine.worker_of("running") is not None)
        engine.drain()
        assert not engine.is_ready() and engine.is_draining()
        with pytest.raises(AdmissionError) as refused:
            await generate(engine, "new", [1, 2, 3], 5)
        assert refused.value.kind is Refusal.UNAVAILABLE
        tokens, finish, error = await running
        assert error is None and len(tokens) == 40
        await asyncio.wait_for(engine.wait_drained(), 5)


# --- gateway loss -------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_gateway_killed_workers_exit() -> None:
    command = [sys.executable, "-m", "paged.ops.pagedd", "--log-json", "serve", "--null-model", "--workers", "2", "--port", str(free_port())]
    gateway = subprocess.Popen(command, cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
    worker_pids: list[int] = []
    try:
        assert gateway.stderr is not None
        for line in gateway.stderr:
            event = msgspec.json.decode(line) if line.startswith("{") else {}
            if event.get("event") == "worker_registered":
                worker_pids.append(event["pid"])
            if event.get("event") == "serving":
                break
        assert len(worker_pids) == 2 and all(map(pid_alive, worker_pids))
        gateway.kill()
        gateway.wait(5)
        deadline = time.monotonic() + 10
        while any(map(pid_alive, worker_pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(pid_alive, worker_pids)), "orphaned worker processes"
    finally:
        gateway.kill()
        for pid in worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_worker_waits_for_a_new_gateway_when_asked() -> None:
    runtime = RuntimeDir()
    endpoint = runtime.endpoint("waiting.sock")
    process = start_split_worker(endpoint, "--on-gateway-loss", "wait", "--gateway-timeout", "0.5")
    context = zmq.asyncio.Context()
    try:
        first = WorkerLink(context, endpoint, name="w", gateway_id="first")
        await first.register(timeout=60)
        await first._end_session()  # the gateway vanishes without a Shutdown
        await asyncio.sleep(1.0)
        assert process.poll() is None  # still there, waiting
        second = WorkerLink(context, endpoint, name="w", gateway_id="second")
        await second.register(timeout=10)
        step = StepInput(0, scheduled=[ScheduledSeq(7, 0, 3, 0, [0])], new_seqs=[NewSequence(7, [1, 2, 3], SamplingParams())])
        await second.send_step(step)
        output = await asyncio.wait_for(second.receive(), 5)
        assert output.step_id == 0 and [r.seq_id for r in output.results] == [7]
        await second.close()
        assert process.wait(10) == 0  # Shutdown: a clean exit
    finally:
        process.kill()
        context.term()
        runtime.close()
