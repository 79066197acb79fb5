"""A batch of JSON-line requests through an engine: what `jaxmoe-serve` runs, without its flags or files.

Every line gets exactly one response: a line that cannot be served (empty,
not UTF-8, not JSON, a bad field, a duplicate id, an unknown tenant, too long,
anything that raises while it is validated) is answered with an error response
as soon as it is read; the others are queued and answered as they finish.
Each response carries `line`, its 1-based input line number. Ids must be
unique in a batch: a later line reusing an id gets an error response.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxmoe.serving import requests as req_lib

Write = Callable[[dict], None]  # one response, with its "line"


def submit_lines(lines: list[bytes], engine, write: Write) -> tuple[dict[str, int], int]:
  """Validates every line; refused ones are written at once. Returns ({id: line} queued, lines refused)."""
  ids, queued, refused = req_lib.UniqueIds(), {}, 0
  for n, line in enumerate(lines, start=1):
    rid, model = req_lib.line_id(line, n), None
    try:
      if not line.strip():
        raise req_lib.RequestError(f"line {n} is empty")
      request = req_lib.parse_line(line, n)
      rid, model = request.id, request.model
      ids.claim(rid, n)
      request, prompt = engine.check(request)
    except Exception as e:  # any failure on one line is that line's answer, never the batch's end
      ids.record(rid, n)
      message = (
        str(e) if isinstance(e, req_lib.RequestError) else f"cannot serve this request ({type(e).__name__}: {e})"
      )
      write({**req_lib.error_response(rid, model, message), "line": n})
      refused += 1
      continue
    engine.submit(request, prompt=prompt)  # checked just above: not checked again
    queued[rid] = n
  return queued, refused


def serve_lines(lines: list[bytes], engine, write: Write, progress: Callable[[int], None] = lambda n: None) -> dict:
  """Answers every line (see the module docstring); returns the engine's summary, refused lines counted."""
  queued, refused = submit_lines(lines, engine, write)
  progress(refused)
  while engine.has_work:
    for response in engine.step():
      write({**response, "line": queued.get(response["id"], 0)})
      progress(1)
  summary = engine.summary()
  summary["requests"] += refused  # refused lines never reached the engine
  summary["errors"] += refused
  return summary
