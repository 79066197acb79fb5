"""What a streamed answer has sent of its text.

The engine's per-token deltas (jaxmoe/serving/detok.py) already hold back a
partial character and a tail that may still become a stop string, so they add
up to the final text; this only keeps count, and hands out whatever of the
final text has not been sent when the request ends.
"""

from __future__ import annotations


class SentText:
  def __init__(self):
    self.sent = ""

  def push(self, delta: str) -> str:
    self.sent += delta
    return delta

  def finish(self, final_text: str) -> str:
    """The rest of the final text (the engine's, authoritative)."""
    if not final_text.startswith(self.sent):
      return ""
    rest, self.sent = final_text[len(self.sent) :], final_text
    return rest
