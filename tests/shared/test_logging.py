"""Progress events (shared/logging.py): a terminal shows their sentence alone, with the worker they
come from; JSON keeps the event and its fields without the sentence."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from paged.shared.logging import configure_logging, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    configure_logging("info", json=False)  # what tests/conftest.py set


def test_a_terminal_shows_the_sentence_and_the_worker(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=False)
    log = get_logger("test")
    log.info("model_loading", progress="loading the built-in model on cpu…", model="builtin", device="cpu")
    structlog.contextvars.bind_contextvars(worker_id="3")
    log.info("kv_cache_allocated", progress="KV cache ready", num_blocks=7)
    log.info("plain_event", num_blocks=7)
    first, second, third = capsys.readouterr().err.splitlines()
    assert first.endswith("[info     ] loading the built-in model on cpu…")
    assert second.endswith("[info     ] worker 3: KV cache ready")
    assert "plain_event" in third and "num_blocks=7" in third and "worker_id=3" in third


def test_json_keeps_the_fields_without_the_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    get_logger("test").info("model_loading", progress="loading…", model="builtin", device="cpu")
    event = json.loads(capsys.readouterr().err)
    assert {k: event[k] for k in ("event", "model", "device", "level")} == {
        "event": "model_loading", "model": "builtin", "device": "cpu", "level": "info",
    }  # fmt: skip
    assert "progress" not in event
