"""Incremental detokenization and stop-string matching across token (and chunk) boundaries.

`IncrementalText` turns a growing list of token ids into text, emitting only text that can no longer
change: a token whose bytes end inside a multi-byte character is held back until the character is
complete (the decoded tail then ends with U+FFFD). `StopStrings` watches that text for any of the
request's stop strings, so a stop string split over several tokens, or over two decode steps, still
matches; it reports the first match by position, and the text trimmed before it (SGLang's behaviour,
kept whole with `no_stop_trim`).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# Tokens decoded again before the newest one, so merges that depend on the left context come out right.
CONTEXT_TOKENS = 6


class IncrementalText:
    """Text of a token stream, produced piece by piece."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were decoded into the tail of `text`
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        new = after[len(before):]
        self.text += new
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset]) if self.read_offset else ""
        rest = self._decode(self.ids[self.prefix_offset:])[len(before):]
        self.text += rest
        self.read_offset = len(self.ids)
        return rest


class StopStrings:
    """Watch a request's text for its stop strings. Without any, tokens are only kept and the text is decoded
    once at the end, not twice per token."""

    def __init__(self, tokenizer, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.detok = IncrementalText(tokenizer)
        self.matched: str | None = None
        self.match_at = -1  # index in `text` where the matched stop string starts

    @property
    def text(self) -> str:
        return self.detok.text

    def extend(self, token_ids: list[int]) -> None:
        """Add tokens when there is no stop string to watch: kept, and decoded once in output_text."""
        assert not self.stops, "tokens of a request with stop strings go through push"
        self.detok.ids.extend(token_ids)

    def push(self, token_id: int) -> str | None:
        """Add one token; return the stop string it completes, if any (the earliest one in the text)."""
        if not self.stops:
            self.extend([token_id])
            return None
        if self.matched is not None:
            return self.matched
        start = max(0, len(self.detok.text) - self.longest + 1)
        if not self.detok.push(token_id):
            return None
        window = self.detok.text[start:]
        hits = [(window.find(s), -len(s), s) for s in self.stops if s in window]
        if not hits:
            return None
        pos, _, stop = min(hits)
        self.matched, self.match_at = stop, start + pos
        return stop

    def forget(self) -> None:
        """Drop a match (one that came before min_new_tokens does not count)."""
        self.matched, self.match_at = None, -1

    def output_text(self, no_stop_trim: bool) -> str:
        """The text so far, cut before the matched stop string unless `no_stop_trim`."""
        self.detok.flush()
        if self.matched is None or no_stop_trim:
            return self.detok.text
        return self.detok.text[:self.match_at]
