"""Incremental text for streaming: each chunk is the difference of the decoded text, never a retraction.

Two things in the decoded text of an unfinished request may still change, so they are held back
until they settle (or the request ends):
  - trailing U+FFFD: the last token(s) may be an incomplete UTF-8 sequence the next byte completes;
  - a suffix that is the start of a stop string: if the stop string completes, it is cut away.
Everything sent is therefore a prefix of the final text, and the chunks join to exactly it.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.sent = ""

    def _held_back(self, text: str) -> int:
        """How many trailing characters of `text` may still change."""
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):  # longest proper prefix of s ending text
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def delta(self, text: str, final: bool) -> str:
        """The new text to send, given the request's whole decoded text so far."""
        ready = text if final else text[:len(text) - self._held_back(text)]
        if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        out = ready[len(self.sent):]
        self.sent = ready
        return out
