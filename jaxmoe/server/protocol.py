"""OpenAI request bodies (pydantic) and the response and chunk bodies built from engine responses.

The fields the engine serves (model, prompt, max_tokens, temperature, top_p,
stop, seed) are typed `Any` here on purpose: their values are validated by
`jaxmoe.serving.requests.parse_request` through `Engine.check`, the one path
the batch CLI shares, so both answer a bad value with the same message. The
pydantic models type the server-only fields and refuse unknown ones; values
of OpenAI fields this server does not implement get a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from jaxmoe.server.errors import bad_request

ENGINE_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed")


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid")
  include_usage: bool = False


class _Common(BaseModel):
  model_config = ConfigDict(extra="forbid")
  model: Any = None
  max_tokens: Any = None
  temperature: Any = None
  top_p: Any = None
  stop: Any = None
  seed: Any = None
  n: int | None = None
  stream: bool | None = False
  stream_options: StreamOptions | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  user: str | None = None  # accepted and ignored, as an end-user id for abuse tracking


class CompletionRequest(_Common):
  prompt: Any = None
  echo: bool | None = None
  best_of: int | None = None
  suffix: str | None = None
  logprobs: int | None = None


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed to the template
  role: str
  content: str | list[dict] | None = None


class ChatCompletionRequest(_Common):
  messages: list[ChatMessage]
  max_completion_tokens: Any = None
  logprobs: bool | None = None
  top_logprobs: int | None = None
  tools: Any = None
  tool_choice: Any = None
  functions: Any = None
  function_call: Any = None
  response_format: Any = None
  parallel_tool_calls: Any = None


def _unsupported(name: str, what: str):
  return bad_request(f"'{name}' {what} is not supported by this server", name)


def check_common(req: _Common) -> None:
  """400 for values of OpenAI fields this server does not implement."""
  if req.n not in (None, 1):
    raise bad_request("'n' other than 1 is not supported", "n")
  if req.stream_options is not None and not req.stream:
    raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
  for name in ("presence_penalty", "frequency_penalty"):
    if getattr(req, name) not in (None, 0):
      raise _unsupported(name, "other than 0")
  if req.logit_bias:
    raise _unsupported("logit_bias", "(non-empty)")


def check_completion(req: CompletionRequest) -> None:
  check_common(req)
  if req.echo:
    raise _unsupported("echo", "true")
  if req.best_of not in (None, 1):
    raise _unsupported("best_of", "other than 1")
  if req.suffix:
    raise _unsupported("suffix", "(insertion)")
  if req.logprobs is not None:
    raise _unsupported("logprobs", "(token log-probabilities)")


def check_chat(req: ChatCompletionRequest) -> None:
  check_common(req)
  if req.logprobs:
    raise _unsupported("logprobs", "true")
  if req.top_logprobs is not None:
    raise _unsupported("top_logprobs", "")
  for name in ("tools", "functions", "function_call", "parallel_tool_calls"):
    if getattr(req, name) is not None:
      raise _unsupported(name, "(tool calling)")
  if req.tool_choice not in (None, "none"):
    raise _unsupported("tool_choice", "(tool calling)")
  if req.response_format not in (None, {"type": "text"}):
    raise _unsupported("response_format", "other than {'type': 'text'}")
  if not req.messages:
    raise bad_request("'messages' must hold at least one message", "messages")
  if req.max_tokens is not None and req.max_completion_tokens is not None:
    if req.max_tokens != req.max_completion_tokens:
      raise bad_request("'max_tokens' and 'max_completion_tokens' differ; give one", "max_tokens")


def engine_fields(req: _Common) -> dict:
  """The request for Engine.check: the engine's fields that were given (the rest take its defaults)."""
  out = {"model": req.model}
  for name in ENGINE_FIELDS:
    value = getattr(req, name)
    if value is not None:
      out[name] = value
  if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
    out["max_tokens"] = req.max_completion_tokens
  return out


def completion_prompt(prompt) -> dict:
  """OpenAI's `prompt` (a string, token ids, or a one-element list of either) -> prompt or prompt_ids."""
  if prompt is None:
    raise bad_request("'prompt' is required: a string or a list of token ids", "prompt")
  if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    if len(prompt) > 1:
      raise bad_request(
        f"'prompt' holds {len(prompt)} prompts; batched prompts are not supported: send one request per prompt",
        "prompt",
      )
    prompt = prompt[0]
  if isinstance(prompt, list):
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
      raise bad_request("'prompt' must be a string or a list of integer token ids", "prompt")
    return {"prompt_ids": prompt}
  return {"prompt": prompt}  # not a string: parse_request names the type


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
  """Messages as the template reads them: content parts joined into one string."""
  out = []
  for i, m in enumerate(messages):
    d = m.model_dump(exclude_none=True)
    if m.content is None and m.role != "assistant":  # only an assistant turn (with tool calls) may omit it
      raise bad_request(f"messages[{i}]: 'content' is required for a {m.role!r} message", "messages")
    if isinstance(m.content, list):
      texts = []
      for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
          raise bad_request(f"messages[{i}]: only text content parts are supported, got {part.get('type')!r}")
        texts.append(part["text"])
      d["content"] = "".join(texts)
    out.append(d)
  return out


def usage(response: dict) -> dict:
  return dict(response["usage"])


def completion_body(rid: str, created: int, response: dict) -> dict:
  choice = {
    "index": 0,
    "text": response["text"],
    "logprobs": None,
    "finish_reason": response["finish_reason"],
    "token_ids": response["token_ids"],  # jaxmoe extra: the generated token ids
  }
  return _envelope(rid, "text_completion", created, response["model"], [choice], usage(response))


def chat_body(rid: str, created: int, response: dict) -> dict:
  choice = {
    "index": 0,
    "message": {"role": "assistant", "content": response["text"]},
    "logprobs": None,
    "finish_reason": response["finish_reason"],
    "token_ids": response["token_ids"],
  }
  return _envelope(rid, "chat.completion", created, response["model"], [choice], usage(response))


def completion_chunk(rid, created, model, text, token_ids, finish_reason=None) -> dict:
  choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids}
  return _envelope(rid, "text_completion", created, model, [choice], None)


def chat_chunk(rid, created, model, text, token_ids, finish_reason=None, first=False) -> dict:
  delta = {"role": "assistant", "content": text} if first else {"content": text}
  choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids}
  return _envelope(rid, "chat.completion.chunk", created, model, [choice], None)


def usage_chunk(rid, created, model, obj: str, usage_: dict) -> dict:
  """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
  return _envelope(rid, obj, created, model, [], usage_)


def _envelope(rid, obj, created, model, choices, usage_) -> dict:
  return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage_}
