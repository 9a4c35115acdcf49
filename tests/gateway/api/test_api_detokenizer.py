"""Incremental detokenization and stop strings, with the stories260K tokenizer (byte-fallback tokens)."""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged.gateway.api.detokenizer import IncrementalDetokenizer
from paged.gateway.api.stop_strings import StopStringMatcher
from paged.shared.tokenizer import Tokenizer
from support.api_fixtures import MODEL, base_url, client, engine, sse_payloads, story_ids, tokenizer  # noqa: F401
from support.fake_engine import FakeEngine

UNICODE = "Lily saw a snowman ☃ and said café, 日本 — ok"


def stream_text(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    return [detok.add(t) for t in generated] + [detok.flush()]


def test_byte_fallback_never_splits_a_character(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Hi")
    generated = tokenizer.encode(UNICODE, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(generated))  # the test means something
    pieces = stream_text(tokenizer, prompt, generated)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)):]
    assert "".join(pieces).startswith(" Lily")  # the first token keeps its leading space


def test_incomplete_character_flushed_at_end(tokenizer: Tokenizer) -> None:
    snowman = tokenizer.encode("☃", add_special_tokens=False)
    pieces = stream_text(tokenizer, tokenizer.encode("a"), snowman[:-1])  # ends mid-character
    assert "".join(pieces[:-1]) == " "  # the "▁" before the bytes; the two bytes are held
    assert pieces[-1].endswith("\ufffd")


def test_special_tokens_skipped(tokenizer: Tokenizer) -> None:
    generated = tokenizer.encode("the end", add_special_tokens=False) + [2]
    assert "".join(stream_text(tokenizer, tokenizer.encode("a"), generated)) == " the end"


@settings(max_examples=1000, deadline=None)
@given(text=st.text(alphabet="ab c☃é", max_size=30), pieces=st.lists(st.integers(1, 4), max_size=30),
       stop=st.lists(st.text(alphabet="ab c☃é", min_size=1, max_size=4), max_size=3))
def test_stop_strings_property(text: str, pieces: list[int], stop: list[str]) -> None:
    """Whatever the chunking, the emitted text is the text cut before the stop string that is
    complete first, and no emitted prefix ever contains a stop string."""
    chunks, rest = [], text
    for size in pieces:
        chunks.append(rest[:size])
        rest = rest[size:]
    chunks.append(rest)
    matcher = StopStringMatcher(stop)
    out, stopped = "", False
    for chunk in chunks:
        emitted, stopped = matcher.feed(chunk)
        out += emitted
        assert not any(s in out for s in stop)
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    ends = [(text.find(s) + len(s), text.find(s)) for s in stop if s in text]  # the first stop to complete wins
    assert out == (text[: min(ends)[1]] if ends else text)
    assert stopped == bool(ends)


def test_stop_string_split_across_chunks_is_held_back() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("hello </") == ("hello ", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("x") == ("</enx", False)  # not a stop after all: released
    assert matcher.feed(" </e") == (" ", False)
    assert matcher.feed("nd> tail") == ("", True)


async def test_streamed_chunks_carry_whole_characters(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer) -> None:
    generated = tokenizer.encode(UNICODE, add_special_tokens=False)
    engine.script = lambda prompt, j: generated
    payloads = await sse_payloads(client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 100})
    texts = [p["choices"][0]["text"] for p in payloads[:-1]]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == " " + UNICODE
    assert payloads[-2]["choices"][0]["finish_reason"] == "stop"  # the script ran out: the fake's EOS


async def test_stop_string_across_token_chunks(client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer) -> None:
    generated = tokenizer.encode(UNICODE, add_special_tokens=False)
    engine.script = lambda prompt, j: generated
    stop = "café"  # spans several tokens, byte-fallback ones included
    payloads = await sse_payloads(client, "/v1/completions", {"prompt": "Hi", "max_tokens": 100, "stop": stop})
    texts = [p["choices"][0]["text"] for p in payloads[:-1]]
    assert "".join(texts) == " " + UNICODE[: UNICODE.index(stop)]
    assert not any("caf" in t for t in texts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # read-only fixture
@given(text=st.text(max_size=40), prompt_text=st.text(min_size=1, max_size=10))
def test_streamed_text_equals_whole_decode(tokenizer: Tokenizer, text: str, prompt_text: str) -> None:
    """Any text (byte-fallback characters included), cut into one-token pieces, adds up to the
    whole decode with no piece carrying a replacement character that the text does not have."""
    prompt = tokenizer.encode(prompt_text)
    generated = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream_text(tokenizer, prompt, generated)
    assert "".join(pieces) == tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)):]
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)
