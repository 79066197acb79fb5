"""One request in the engine: its prompt, tokens, text stream, pages, timings and response."""

from __future__ import annotations

import dataclasses

from jaxmoe.serving.detok import TextStream
from jaxmoe.serving.requests import Request


@dataclasses.dataclass
class Sequence:
  request: Request
  prompt: list[int]
  arrival: float
  stream: TextStream | None = None
  admitted: float | None = None
  first_token: float | None = None
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  row: int = -1
  pages: list[int] = dataclasses.field(default_factory=list)  # self-attention pages, then cross pages
  cross_pages: list[int] = dataclasses.field(default_factory=list)

  @property
  def text(self) -> str:
    return self.stream.text if self.stream is not None else ""

  def response(self, now: float) -> dict:
    n = len(self.tokens)
    return {
      "id": self.request.id,
      "object": "text_completion",
      "model": self.request.model,
      "text": self.text,
      "token_ids": self.tokens,
      "finish_reason": self.finish_reason,
      "usage": {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n},
      "timings": {
        "queue_s": self.admitted - self.arrival,
        "ttft_s": self.first_token - self.arrival,
        "tpot_s": (now - self.first_token) / (n - 1) if n > 1 else 0.0,
        "turnaround_s": now - self.arrival,
      },
      "error": None,
    }
