"""Tokenizers: the checkpoint's `tokenizer.json`, or bytes for models trained here."""

from __future__ import annotations

import os
import pathlib
from typing import Protocol

from jaxmoe.errors import CheckpointError


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255, then BOS, EOS and PAD at 256, 257, 258."""

  vocab_size = 259
  bos_id, eos_id, pad_id = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return [self.bos_id, *text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizer.json` through the `tokenizers` library (no transformers, no torch)."""

  def __init__(self, path: str | os.PathLike, bos_id=None, eos_id=None, pad_id=None):
    from tokenizers import Tokenizer as _Tokenizer

    try:
      self._tok = _Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on a damaged file
      raise CheckpointError(f"{path}: not a readable tokenizer ({' '.join(str(e).split())[:200]})") from None
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(folder: str | os.PathLike, cfg) -> Tokenizer | None:
  """`folder/tokenizer.json` when present, else the byte tokenizer when the vocab fits it.

  None when neither applies (a model that only takes token ids).
  """
  path = pathlib.Path(folder) / "tokenizer.json"
  if path.is_file():
    eos = cfg.eos_ids[0] if cfg.eos_ids else None  # generation stops on every id of cfg.eos_ids
    return HFTokenizer(path, cfg.bos_token_id, eos, cfg.pad_token_id)
  if cfg.vocab_size == ByteTokenizer.vocab_size:
    return ByteTokenizer()
  return None
