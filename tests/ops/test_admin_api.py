"""The admin API and pagedctl in-process: a real AsyncEngine whose worker registration is attached
by hand (no worker process), its scheduler driven by the simulated worker, the admin app served on
a unix socket in the test's event loop, and pagedctl run against it through click's runner."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import matplotlib.image
import msgspec
import pytest
from click.testing import CliRunner, Result

from paged.gateway.admin.app import build_admin_app
from paged.gateway.admin.listener import AdminSettings, AdminSocketError, bind_admin_socket, bind_unix_socket
from paged.gateway.admin.server import AdminServer
from paged.gateway.engine import AsyncEngine
from paged.gateway.replica import WorkerSpec
from paged.gateway.memory_map import memory_map
from paged.gateway.request import Request
from paged.ops.cli import main as pagedctl
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.admin_socket import default_admin_socket
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.logging import configure_logging
from paged.shared.protocol import WorkerRegistration
from paged.shared.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 32


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The in-process server logs to stderr at warning, so pagedctl's stdout holds only its output."""
    configure_logging("warning", json=True)
    yield
    configure_logging("info", json=True)


@pytest.fixture
def engine() -> Iterator[AsyncEngine]:
    engine = AsyncEngine([WorkerSpec("ipc:///nonexistent")], SchedulerConfig(kv_watermark=0.0), CacheConfig(block_size=BS))
    engine.supervisor.max_model_len = 256
    engine.supervisor.attach(engine.replicas[0], WorkerRegistration(1, "w0", NUM_BLOCKS, 0, BS, 256, "test-model", "cpu", "float32", 1))
    yield engine
    engine.supervisor.context.term()


def add_running(engine: AsyncEngine, request_id: str, prompt: list[int]) -> StepLoop:
    scheduler = engine.replicas[0].scheduler
    assert scheduler is not None
    scheduler.add_request(Request(request_id, prompt, SamplingParams(max_tokens=30), eos_token_ids=frozenset({0})))
    loop = StepLoop(scheduler, SimulatedWorker(NUM_BLOCKS, BS, choose_token=lambda s, p: 1 + p % 50), overlapped=False)
    loop.step()
    loop.step()
    return loop


@pytest.fixture
async def admin(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[AdminServer]:
    settings = AdminSettings(tmp_path / "admin.sock")
    server = AdminServer(engine, settings, "test-served", bind_admin_socket(settings))
    await server.start()
    for _ in range(200):  # uvicorn starts listening within the first loop iterations
        if server._servers[0].started:
            break
        await asyncio.sleep(0.01)
    yield server
    await server.stop()


async def ctl(server: AdminServer, *args: str) -> Result:
    """pagedctl in a thread, so the admin server keeps running in this event loop."""
    argv = [args[0], "--socket", str(server.socket_path), *args[1:]]
    return await asyncio.to_thread(CliRunner().invoke, pagedctl, argv)


def client(engine: AsyncEngine, token: str | None = None) -> httpx.AsyncClient:
    app = build_admin_app(engine, "test-served", token=token)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")


async def test_read_endpoints_report_the_scheduler(engine: AsyncEngine) -> None:
    add_running(engine, "a", list(range(1, 11)))
    scheduler = engine.replicas[0].scheduler
    async with client(engine) as http:
        status = (await http.get("/v1/status")).json()
        assert (status["model"], status["served_model_name"], status["draining"]) == ("test-model", "test-served", False)
        assert status["workers"][0]["state"] == "disconnected"  # attached by hand: no live link
        assert status["workers"][0]["used_blocks"] == 3 and status["running_seqs"] == 1
        worker = status["workers"][0]
        assert worker["kv_thrashing"] is False and worker["goodput"] == 1.0 and worker["recomputed_tokens"] == 0
        assert {"preemptions_per_s", "evictions_per_s", "window_prefix_hit_rate", "admission_margin"} <= set(worker)
        assert status["policy"]["scheduler"]["admission_policy"] == "predictive"
        assert status["policy"]["cache"]["block_size"] == BS
        memmap = (await http.get("/v1/workers/0/memmap")).json()
        assert memmap == msgspec.to_builtins(memory_map(scheduler, "0"))
        requests = (await http.get("/v1/requests")).json()
        assert [r["id"] for r in requests] == ["a"]
        one = (await http.get("/v1/requests/a")).json()
        assert one["seqs"][0]["block_table"] == scheduler.kv.block_table(scheduler.requests["a"].seqs[0].seq_id)
        assert (await http.get("/v1/cache")).json()[0]["worker"] == "0"
        for path in ("/v1/requests/nope", "/v1/workers/7/memmap"):
            response = await http.get(path)
            assert response.status_code == 404 and "error" in response.json()
        assert (await http.post("/v1/requests/nope/abort")).status_code == 404
        # Unknown paths and methods answer in the same shape, not starlette's plain text.
        for method, path, code in (("GET", "/v1/nope", 404), ("GET", "/v1/drain", 405)):
            response = await http.request(method, path)
            assert response.status_code == code and path in response.json()["error"], response.text


async def test_actions_drain_resume_flush_and_log_level(engine: AsyncEngine) -> None:
    loop = add_running(engine, "a", list(range(1, 17)))
    loop.run()  # a finishes: its full blocks stay cached-free
    scheduler = engine.replicas[0].scheduler
    cached = scheduler.stats().cached_blocks
    assert cached >= 4
    async with client(engine) as http:
        assert (await http.post("/v1/drain")).json() == {"draining": True}
        assert engine.is_draining()
        assert (await http.post("/v1/resume")).json() == {"draining": False}
        assert not engine.is_draining()
        assert (await http.post("/v1/flush-cache")).json() == {"flushed_blocks": cached, "flushed_store_entries": 0}
        assert scheduler.stats().cached_blocks == 0
        assert (await http.post("/v1/log-level", json={"level": "loud"})).status_code == 400
        assert (await http.post("/v1/log-level", content=b"not json")).status_code == 400
        assert (await http.post("/v1/log-level", json={"level": "DEBUG"})).json() == {"level": "debug"}


async def test_pagedctl_cache_shows_both_tiers(tmp_path: Path) -> None:
    """Two workers attached to one host KV store: a prompt computed on worker 0 and evicted there is
    loaded from the store on worker 1; `pagedctl cache` shows the pools and the one shared store."""
    engine = AsyncEngine([WorkerSpec("ipc:///none-0"), WorkerSpec("ipc:///none-1")], SchedulerConfig(kv_watermark=0.0),
                         CacheConfig(block_size=BS, kv_store_eviction_policy="lfu"))
    engine.supervisor.max_model_len = 64
    pool_blocks = 4  # one request at a time: the next one evicts all of the last one's blocks
    for replica in engine.replicas:
        engine.supervisor.attach(replica, WorkerRegistration(
            1, f"w{replica.name}", pool_blocks, 0, BS, 64, "test-model", "cpu", "float32", 1,
            kv_store_id="host-store", num_store_slots=32, page_bytes=4096,
        ))  # fmt: skip
    arena: list[list[int | None]] = [[None] * BS for _ in range(32)]
    loops = [StepLoop(r.scheduler, SimulatedWorker(pool_blocks, BS, store=arena), overlapped=False) for r in engine.replicas]  # type: ignore[arg-type]
    first, second = (r.scheduler for r in engine.replicas)
    assert first.store.index is second.store.index  # type: ignore[union-attr]
    for number, prompt in enumerate(([5] * 12 + [1], [6] * 12 + [1])):  # the second evicts the first
        first.add_request(Request(f"a{number}", prompt, SamplingParams(max_tokens=2), eos_token_ids=frozenset()))  # type: ignore[union-attr]
        loops[0].run()
    second.add_request(Request("b", [5] * 12 + [2], SamplingParams(max_tokens=2), eos_token_ids=frozenset()))  # type: ignore[union-attr]
    loops[1].run()
    assert second.stats().store_hits_tokens == 12  # type: ignore[union-attr]
    settings = AdminSettings(tmp_path / "admin.sock")
    server = AdminServer(engine, settings, "test-served", bind_admin_socket(settings))
    await server.start()
    try:
        summaries = json.loads((await ctl(server, "cache", "--json")).output)
        assert [c["store"]["store_id"] for c in summaries] == ["host-store", "host-store"]
        assert summaries[1]["store_hits_tokens"] == 12 and summaries[0]["store"]["policy"] == "lfu"
        result = await ctl(server, "cache")
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0] == "pool tier" and "store hits" in lines[1]
        store_row = lines[lines.index("host KV store tier") + 2].split()
        assert store_row[:3] == ["host-store", "0,1", "lfu"]
        flushed = json.loads((await ctl(server, "flush-cache", "--json")).output)
        assert flushed["flushed_store_entries"] > 0
    finally:
        await server.stop()
        engine.supervisor.context.term()


async def test_the_tcp_app_requires_the_token(engine: AsyncEngine) -> None:
    async with client(engine, token="s3cret") as http:
        assert (await http.get("/v1/status")).status_code == 401
        assert (await http.get("/v1/status", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await http.get("/v1/status", headers={"Authorization": "Bearer s3cret"})).status_code == 200


def test_admin_port_settings_need_a_token_and_loopback() -> None:
    with pytest.raises(ValueError, match="admin-token"):
        AdminSettings(port=9000)
    with pytest.raises(ValueError, match="loopback"):
        AdminSettings(port=9000, token="t", host="0.0.0.0")


async def test_pagedctl_over_the_unix_socket(engine: AsyncEngine, admin: AdminServer, tmp_path: Path) -> None:
    add_running(engine, "req-a", list(range(1, 11)))
    assert stat.S_IMODE(admin.socket_path.stat().st_mode) == 0o600
    result = await ctl(admin, "memmap", "--json")
    assert result.exit_code == 0, result.output
    blocks = json.loads(result.output)["blocks"]
    assert sum(1 for block in blocks if block.get("holders") == ["req-a"]) == 3
    result = await ctl(admin, "memmap", "--png", str(tmp_path / "map.png"))
    assert result.exit_code == 0, result.output
    assert "worker 0" in result.output and "external frag." in result.output and "req-a" in result.output
    image = matplotlib.image.imread(tmp_path / "map.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    for command, expected in (
        (["status"], "test-served"),
        (["status"], "KV pool not thrashing"),
        (["requests"], "req-a"),
        (["request", "req-a"], "computed or in flight) blocks: ["),
        (["cache"], "hit rate"),
        (["top", "--iterations", "2", "--interval", "0.05"], "req-a"),
    ):
        result = await ctl(admin, *command)
        assert result.exit_code == 0 and expected in result.output, result.output
    result = await ctl(admin, "top", "--json", "--iterations", "2", "--interval", "0.05")
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 2 and lines[1]["requests"][0]["id"] == "req-a"
    assert json.loads((await ctl(admin, "drain", "--json")).output) == {"draining": True}
    assert "resumed" in (await ctl(admin, "resume")).output
    assert "flushed 0" in (await ctl(admin, "flush-cache")).output
    result = await ctl(admin, "abort", "no-such-request")
    assert result.exit_code == 1 and result.output.strip() == "Error: no unfinished request 'no-such-request'"


@pytest.mark.parametrize("command", [["status"], ["memmap"], ["requests"], ["request", "x"], ["cache"], ["top"], ["abort", "x"], ["drain"], ["resume"], ["flush-cache"], ["log-level", "info"]])
def test_every_command_fails_in_one_line_without_a_daemon(command: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(pagedctl, [*command, "--socket", str(tmp_path / "absent.sock")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "cannot reach the paged admin API" in result.output


def test_a_public_api_port_is_not_mistaken_for_the_admin_api(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(pagedctl, ["status", "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAGED_ADMIN_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert default_admin_socket() == Path(f"/tmp/paged-{os.getuid()}/admin.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_admin_socket() == Path("/run/user/1000/paged/admin.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/paged")
    assert default_admin_socket() == Path("/run/paged/admin.sock")
    monkeypatch.setenv("PAGED_ADMIN_SOCKET", "/srv/x.sock")
    assert default_admin_socket() == Path("/srv/x.sock")


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "admin.sock"
    first = bind_unix_socket(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(AdminSocketError):
        bind_unix_socket(path)
    first.close()  # the file stays behind, as after a crash
    bind_unix_socket(path).close()


def test_an_explicit_socket_path_that_cannot_be_served_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AdminSocketError, match="cannot serve the admin API"):
        bind_unix_socket(tmp_path / ("x" * 120) / "admin.sock")  # longer than a unix socket path may be
