"""Stop strings over a stream of text pieces: the stop string and everything after it is never
emitted, and neither is text that might turn out to be the start of one."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]) -> None:
        self._stop = stop
        self._held = ""  # text that is a prefix of some stop string, withheld until it resolves

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found). After a stop, the
        caller must not feed any more."""
        if not self._stop:
            return text, False
        pending = self._held + text
        # Generation would have stopped at the stop string that is complete first (earliest end),
        # however the text happens to be chunked.
        found = [(i + len(s), i) for s in self._stop if (i := pending.find(s)) >= 0]
        if found:
            self._held = ""
            return pending[: min(found)[1]], True
        keep = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """The sequence ended without a stop string: what was withheld is ordinary text after all."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = min(len(text), max(len(s) for s in self._stop) - 1)
        for size in range(longest, 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
