"""Issue 6's proof against a live `pagedd serve` with stories260K and a small page pool: pagedctl
reads the memory map of running requests, sees shared prefixes, aborts, drains, resumes and flushes,
and the admin API is not on the public port."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import matplotlib.image
import pytest
from click.testing import CliRunner

from paged.ops.admin_client import AdminClient
from paged.ops.cli import main as pagedctl
from support.daemon_process import Daemon
from support.daemon_process import parse_metrics, serve_stories

pytestmark = pytest.mark.slow

# ~140 tokens: two full 64-token blocks that a second request with the same prompt shares.
PROMPT = "Once upon a time there was a little girl named Lily. She loved to play outside in the park with her dog. " * 4
WAIT_S = 120


@pytest.fixture(scope="module")
def admin_socket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admin") / "admin.sock"


@pytest.fixture(scope="module")
def server(stories_dir: Path, admin_socket: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # 2 MiB of KV on stories260K: 25 blocks of 64 tokens, room for two long requests (8 blocks each)
    # without preemption. Large blocks change hands rarely (every 64 tokens of a sequence), which
    # gives the tests time to read a consistent memory map while requests decode.
    log_dir = tmp_path_factory.mktemp("admin-live")
    yield from serve_stories(
        log_dir, stories_dir, "--admin-socket", str(admin_socket), "--kv-cache-memory", "2MiB", "--block-size", "64"
    )


def ctl(admin_socket: Path, *args: str) -> Any:
    result = CliRunner().invoke(pagedctl, [args[0], "--socket", str(admin_socket), "--json", *args[1:]])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


class Stream(threading.Thread):
    """A streaming completion in the background; `ended` is set when the stream closes."""

    def __init__(self, url: str, max_tokens: int, prompt: str = PROMPT) -> None:
        super().__init__(daemon=True)
        self.body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
        self.url = url
        self.id: str | None = None
        self.finish: str | None = None
        self.status: int | None = None
        self.error: str | None = None  # the stream's error event (an admin abort ends it with one)
        self.ended = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=WAIT_S) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.error = event["error"]["message"]
                    else:
                        self.id = event["id"]
                        self.finish = event["choices"][0]["finish_reason"] or self.finish
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()


def wait_for(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} (last: {value!r})")


def running(admin_socket: Path, count: int) -> list[dict[str, Any]] | None:
    """The unfinished requests once `count` of them run with at least one generated token."""
    requests = ctl(admin_socket, "requests")
    started = [r for r in requests if r["state"] == "running" and r["generated_tokens"] > 0]
    return requests if len(started) >= count else None


def layout(memory: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Who holds which block, without the fill counts every decode step changes."""
    return [(b["id"], b["state"], b.get("ref", 0), tuple(b.get("holders", ()))) for b in memory["blocks"]]


def consistent_snapshot(server: Daemon, admin_socket: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    """Requests, memory map and metrics read while no block changed hands in between (decodes keep
    running, so retry until the layout before and after agree). Read through one open admin client
    and one HTTP client, which takes milliseconds, where a pagedctl invocation per read takes ~0.1 s:
    long enough for stories260K to fill a block."""
    admin = AdminClient(socket_path=admin_socket)
    with httpx.Client(base_url=server.url) as public:
        for _ in range(50):
            before = admin.get("/workers/0/memmap")
            requests = admin.get("/requests")
            metrics = parse_metrics(public.get("/metrics").text)
            after = admin.get("/workers/0/memmap")
            if layout(before) == layout(after):
                return requests, after, metrics
    pytest.fail("blocks changed hands between every two memory maps")


def test_memmap_shows_exactly_the_block_tables_and_agrees_with_metrics(server: Daemon, admin_socket: Path) -> None:
    # Long requests (the prompt is ~140 tokens of the 512-token context), so they still run while we look.
    first = Stream(server.url, max_tokens=370)
    wait_for(lambda: running(admin_socket, 1), "the first request to run")
    second = Stream(server.url, max_tokens=370)  # same prompt: its full blocks come from the prefix cache
    wait_for(lambda: running(admin_socket, 2), "both requests to run")
    requests, memory, metrics = consistent_snapshot(server, admin_socket)
    assert len(requests) == 2
    from_tables = Counter(block for r in requests for seq in r["seqs"] for block in seq["block_table"])
    held = {block["id"]: block["ref"] for block in memory["blocks"] if block["state"] == "held"}
    assert held == dict(from_tables)
    figures = memory["figures"]
    for name, value in (("used", figures["held"]), ("free", figures["free"]), ("cached", figures["cached"]), ("total", figures["num_blocks"])):
        assert metrics[f'paged_kv_blocks_{name}{{worker=0}}'] == value, name
    shared = [block for block in memory["blocks"] if block.get("ref") == 2]
    ids = sorted(r["id"] for r in requests)
    assert len(shared) >= 2 and all(sorted(block["holders"]) == ids for block in shared)
    assert ctl(admin_socket, "cache")[0]["hottest_prefixes"][0]["holders"] == ids

    # abort ends the first stream (its client sees the end) and frees its blocks
    ctl(admin_socket, "abort", requests[0]["id"])
    stream = first if first.id == requests[0]["id"] else second
    assert stream.ended.wait(WAIT_S) and stream.finish is None and "aborted" in (stream.error or "")
    memory = ctl(admin_socket, "memmap")
    assert all(requests[0]["id"] not in block.get("holders", []) for block in memory["blocks"])
    assert all(block.get("ref", 0) <= 1 for block in memory["blocks"])

    # flush-cache drops cached-free blocks only: the survivor's blocks stay held
    assert memory["figures"]["cached"] > 0
    survivor = requests[1]["id"]
    flushed = ctl(admin_socket, "flush-cache")["flushed_blocks"]
    after = ctl(admin_socket, "memmap")
    assert flushed > 0
    # The survivor's 370 tokens take about a second: on a loaded box it can finish during the admin
    # calls above (its blocks then turn cached-free). Still listed after the map: it held them throughout.
    if any(r["id"] == survivor for r in ctl(admin_socket, "requests")):
        held_before = {b["id"] for b in memory["blocks"] if b["state"] == "held"}
        held_after = {b["id"] for b in after["blocks"] if b["state"] == "held"}
        assert after["figures"]["cached"] == 0
        assert held_before <= held_after and all(b["holders"] == [survivor] for b in after["blocks"] if b["state"] == "held")
    # End the survivor, unless it finished since (then the abort finds no unfinished request).
    result = CliRunner().invoke(pagedctl, ["abort", "--socket", str(admin_socket), "--json", survivor])
    assert result.exit_code == 0 or "no unfinished request" in result.output, result.output
    assert first.ended.wait(WAIT_S) and second.ended.wait(WAIT_S)


def test_drain_refuses_new_requests_lets_running_ones_finish_and_resume_undoes_it(server: Daemon, admin_socket: Path) -> None:
    running_one = Stream(server.url, max_tokens=370)  # long enough to still run when the drain starts
    wait_for(lambda: running(admin_socket, 1), "the request to run")
    assert ctl(admin_socket, "drain") == {"draining": True}
    assert not running_one.ended.is_set()
    try:
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503
        assert running_one.ended.wait(WAIT_S) and running_one.finish == "length" and running_one.status == 200
        assert ctl(admin_socket, "status")["draining"] is True
    finally:
        assert ctl(admin_socket, "resume") == {"draining": False}
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60).status_code == 200


def test_the_admin_api_is_not_on_the_public_port(server: Daemon) -> None:
    for method, path in (("GET", "/v1/status"), ("GET", "/v1/workers/0/memmap"), ("GET", "/v1/requests"), ("POST", "/v1/drain"), ("POST", "/v1/flush-cache")):
        response = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert response.status_code == 404, (path, response.text)
    result = CliRunner().invoke(pagedctl, ["status", "--url", server.url])
    assert result.exit_code == 1 and "is it a paged admin API?" in result.output
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ready"


def test_top_reports_tokens_per_second_while_a_request_runs(server: Daemon, admin_socket: Path) -> None:
    stream = Stream(server.url, max_tokens=370)
    wait_for(lambda: running(admin_socket, 1), "the request to run")
    result = CliRunner().invoke(pagedctl, ["top", "--socket", str(admin_socket), "--json", "--iterations", "2", "--interval", "0.5"])
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["tokens_per_s"] is None and second["tokens_per_s"] >= 0
    assert second["status"]["generation_tokens"] >= first["status"]["generation_tokens"]
    assert stream.ended.wait(WAIT_S)


def test_memmap_png_from_the_installed_pagedctl(server: Daemon, admin_socket: Path, tmp_path: Path) -> None:
    png = tmp_path / "memmap.png"
    pagedctl_bin = Path(sys.executable).parent / "pagedctl"
    done = subprocess.run(
        [str(pagedctl_bin), "memmap", "--socket", str(admin_socket), "--png", str(png)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "worker 0" in done.stdout and "external frag." in done.stdout
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
