"""Chat prompts: each tenant's chat template (tokenizer_config.json), rendered as transformers does.

transformers' `apply_chat_template` compiles the template in a sandboxed
jinja2 environment with trim_blocks and lstrip_blocks, the loopcontrols
extension, a `{% generation %}` block, the `tojson` filter, `raise_exception`
and `strftime_now`, and renders it with `messages`, `add_generation_prompt`
and the special tokens as strings; the text is then tokenized without adding
special tokens (the template writes them). Where a tenant has no
`tokenizer.json` (the byte vocabulary of models trained here) the text goes
through the store's tokenizer, which adds BOS as it does for completions.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxmoe.server.errors import bad_request

log = logging.getLogger("jaxmoe.server")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (marks assistant text for training): renders its body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment() -> ImmutableSandboxedEnvironment:
  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _pick_template(value) -> str | None:
  """`chat_template`: a string, or a list of {"name", "template"} (the "default" one is used)."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    return named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
  return None


class TenantChat:
  """One tenant's compiled chat template, special tokens and tokenizer for chat prompts."""

  def __init__(self, template: jinja2.Template, special: dict, encode):
    self.template, self.special, self.encode = template, special, encode

  def prompt_ids(self, messages: list[dict]) -> list[int]:
    try:
      text = self.template.render(
        messages=messages, add_generation_prompt=True, tools=None, documents=None, **self.special
      )
    except Exception as e:  # raise_exception, undefined names, type errors inside the template
      raise bad_request(f"the chat template rejected these messages: {e}", "messages") from None
    ids = list(self.encode(text))
    if not ids:
      raise bad_request("the chat template renders these messages to no tokens", "messages")
    return ids


def load_tenant_chat(folder: pathlib.Path, fallback_tokenizer, env) -> TenantChat | None:
  """The chat setup of the tenant whose tokenizer files are in `folder`; None without a template."""
  config_path = folder / "tokenizer_config.json"
  if not config_path.is_file():
    return None
  try:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    source = _pick_template(config.get("chat_template"))
    if source is None:
      return None
    template = env.from_string(source)
  except (OSError, ValueError, jinja2.exceptions.TemplateError) as e:
    log.warning("%s: chat template unusable (%s); chat is refused for this tenant", config_path, e)
    return None
  special_map = {}
  special_path = folder / "special_tokens_map.json"
  if special_path.is_file():
    try:
      special_map = json.loads(special_path.read_text(encoding="utf-8"))
    except ValueError:
      special_map = {}
  special = {}
  for name in SPECIAL_TOKENS:
    text = _token_text(config.get(name)) or _token_text(special_map.get(name))
    if text is not None:
      special[name] = text
  tokenizer_json = folder / "tokenizer.json"
  if tokenizer_json.is_file():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
  elif fallback_tokenizer is not None:
    encode = fallback_tokenizer.encode
  else:
    return None
  return TenantChat(template, special, encode)


def load_chats(store) -> dict[str, TenantChat]:
  """{tenant: TenantChat} for the tenants of `store` that ship a chat template."""
  path = getattr(store, "path", None)
  if path is None:
    return {}
  env = environment()
  tokenizer = getattr(store, "tokenizer", None)
  out = {}
  for tenant in store.tenants:
    chat = load_tenant_chat(pathlib.Path(path) / "backbones" / tenant, tokenizer, env)
    if chat is not None:
      out[tenant] = chat
  return out
