"""One answer's text as its tokens arrive: incremental decoding and stop sequences.

Text is shown as ``UnifiedModel.stream_answer`` shows it (an incomplete multi-byte character waits for the rest);
with stop sequences, the tail that could be the start of one also waits, and the text ends before the first stop
sequence it contains (OpenAI's ``stop``: the sequence itself is not returned).
"""

from __future__ import annotations


class AnswerText:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.shown = ""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _cut(self, text: str) -> int | None:
        """Where the first stop sequence starts in ``text`` (searched from where it could start), or None."""
        start = max(0, len(self.shown) - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def add(self, token: int) -> str:
        """Take one token; returns the text that became safe to show."""
        if self.done:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = self._cut(text)
        if cut is not None:
            return self._end(text[:cut], "stop")
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        safe = len(text) - self._held(text)
        if safe <= len(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):safe], text[:safe]
        return delta

    def _held(self, text: str) -> int:
        """How many trailing characters could begin a stop sequence (shown only once they cannot)."""
        for n in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0

    def finish(self, reason: str) -> str:
        """The generation ended (a stop token: "stop", the token limit: "length"): the rest of the text."""
        if self.done:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = self._cut(text)
        return self._end(text if cut is None else text[:cut], reason if cut is None else "stop")

    def _end(self, text: str, reason: str) -> str:
        self.finish_reason = reason
        delta = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return delta

    @property
    def tokens(self) -> int:
        return len(self.ids)
