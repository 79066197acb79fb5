"""Incremental detokenization: each new token's text in amortised constant work, stop strings on a tail.

Decoding a sequence's whole text for every new token costs O(n) per token,
O(n^2) per sequence. `TextStream` decodes a short window instead: the tokens
since the last rendered piece, with the piece before them as context (a
tokenizer may render a token differently at the start of a text, e.g. a
dropped leading space), and holds text back while it ends in an incomplete
UTF-8 character (U+FFFD). Stop strings are searched only where a new match can
be, the new text plus the longest stop string's length before it; text that
could still become a stop string is held back until it cannot, so the streamed
pieces always add up to the final text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
  """The text of a growing token sequence, one delta at a time."""

  def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
    self.tokenizer = tokenizer
    self.stop = tuple(s for s in stop if s)
    self.tail = max((len(s) for s in self.stop), default=0)
    self.text = ""  # rendered so far, cut at a stop string once one appears
    self.stopped = False
    self._sent = 0  # characters of `text` handed out
    self._ids: list[int] = []
    self._prefix = 0  # first token of the context window
    self._read = 0  # first token not yet rendered into `text`

  def push(self, token: int) -> str:
    """Adds one token; returns the text that is now final (may be empty)."""
    if self.stopped:
      return ""
    self._ids.append(int(token))
    prefix_text = self.tokenizer.decode(self._ids[self._prefix : self._read])
    new_text = self.tokenizer.decode(self._ids[self._prefix :])
    if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
      self._prefix, self._read = self._read, len(self._ids)
      self._render(new_text[len(prefix_text) :])
    return self._hand_out(final=self.stopped)

  def finish(self) -> str:
    """Everything not yet handed out, when the sequence ends (an incomplete character renders as the
    tokenizer renders it)."""
    if not self.stopped and self._read < len(self._ids):
      prefix_text = self.tokenizer.decode(self._ids[self._prefix : self._read])
      self._render(self.tokenizer.decode(self._ids[self._prefix :])[len(prefix_text) :])
      self._read = len(self._ids)
    return self._hand_out(final=True)

  def _render(self, delta: str) -> None:
    start = max(0, len(self.text) - self.tail + 1)
    self.text += delta
    cuts = [self.text.find(s, start) for s in self.stop]
    cuts = [c for c in cuts if c >= 0]
    if cuts:
      self.text, self.stopped = self.text[: min(cuts)], True

  def _hand_out(self, final: bool) -> str:
    end = len(self.text) if final else len(self.text) - self._held()
    out = self.text[self._sent : end]
    self._sent = max(self._sent, end)
    return out

  def _held(self) -> int:
    """Length of the longest end of `text` that starts some stop string (it may still complete one)."""
    for n in range(min(self.tail - 1, len(self.text) - self._sent), 0, -1):
      if any(s.startswith(self.text[-n:]) for s in self.stop):
        return n
    return 0
