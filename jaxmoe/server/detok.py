"""Streamed text: the decoded tokens so far, minus what may still change.

Two things in the decoded text of a partial generation can still change: a
trailing replacement character (a multi-byte character whose last bytes have
not been generated yet) and a tail that could grow into a stop string (which
the final text cuts off). `TextStream` sends neither until it is certain, and
the finished response's text settles the rest, so the concatenated chunks
equal the non-streamed text.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"


def stop_holdback(text: str, stops) -> int:
  """Length of the longest tail of `text` that is a proper prefix of a stop string."""
  hold = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), hold, -1):
      if text.endswith(s[:k]):
        hold = k
        break
  return hold


class TextStream:
  """Text deltas of one request from its token ids, as they arrive."""

  def __init__(self, tokenizer, stops=()):
    self.tokenizer, self.stops = tokenizer, tuple(stops)
    self.ids: list[int] = []
    self.sent = ""

  def push(self, ids: list[int]) -> str:
    """Adds generated token ids; returns the text that is now certain and not yet sent."""
    self.ids.extend(ids)
    if self.tokenizer is None:
      return ""
    text = self.tokenizer.decode(self.ids).rstrip(INCOMPLETE)
    cut = min((text.find(s) for s in self.stops if s in text), default=-1)
    if cut >= 0:
      text = text[:cut]
    else:
      text = text[: len(text) - stop_holdback(text, self.stops)]
    return self._advance(text)

  def finish(self, final_text: str) -> str:
    """The rest of the final text (the engine's, authoritative)."""
    return self._advance(final_text)

  def _advance(self, text: str) -> str:
    # A decoded prefix that changed under us (tokenizer clean-up) cannot be taken back: send
    # nothing until the text agrees again, or until the final text does.
    if len(text) <= len(self.sent) or not text.startswith(self.sent):
      return ""
    delta, self.sent = text[len(self.sent) :], text
    return delta
