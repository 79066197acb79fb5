"""Helpers shared by the absl entry points."""

from __future__ import annotations

import signal
import sys
import warnings

from absl import flags, logging


def quiet_library_logs() -> None:
  """orbax logs every save and restore at INFO; entry points show warnings and up.

  An explicit --verbosity on the command line still wins.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def define_moe_impl(help_extra: str = "") -> flags.FlagHolder:
  """The --moe_impl flag of every entry point that runs a model (values: jaxmoe.nn.moe.Impl)."""
  from jaxmoe.nn.moe import Impl

  return flags.DEFINE_enum(
    "moe_impl",
    Impl.AUTO.value,
    [i.value for i in Impl],
    "MoE strategy: auto (Pallas on GPUs, routed elsewhere), dense (reference), experts, "
    "routed, ragged, pallas, pallas_interpret." + help_extra,
  )


def define_verify_checksums() -> flags.FlagHolder:
  """--verify_checksums: compare every checkpoint/store part with its recorded checksum (default on)."""
  return flags.DEFINE_bool(
    "verify_checksums",
    True,
    "Compare every part read with the checksum recorded when it was written, and refuse non-finite "
    "weights (--noverify_checksums skips this pass over the weights).",
  )


DEFAULT_MAX_SEQ_LEN = 512


def define_max_seq_len() -> flags.FlagHolder:
  """--max_seq_len of the serving entry points: unset follows the model (`max_seq_len`)."""
  return flags.DEFINE_integer(
    "max_seq_len",
    None,
    f"Longest prompt + max_tokens; default {DEFAULT_MAX_SEQ_LEN}, or the model's max_position_embeddings if smaller.",
  )


def max_seq_len(flag: int | None, store) -> int:
  """The flag's value if given (the engine refuses one above the model's limit), else the default capped by
  the model's max_position_embeddings: the defaults always start."""
  if flag is not None:
    return flag
  limit = store.config.max_positions
  return DEFAULT_MAX_SEQ_LEN if limit is None else min(DEFAULT_MAX_SEQ_LEN, limit)


def one_line_warnings(prog: str) -> None:
  """Library warnings (a checkpoint without checksums) print as one `prog: warning: ...` line."""
  warnings.formatwarning = lambda message, category, *args, **kwargs: f"{prog}: warning: {message}\n"


def terminate_like_interrupt() -> None:
  """SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does, so atomic writes clean up after themselves."""

  def handler(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)

  for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, handler)


def interrupted(prog: str, e: KeyboardInterrupt, what: str) -> int:
  """The message and exit status (130) of a run stopped by a signal."""
  print(f"{prog}: interrupted by {e.args[0] if e.args else 'SIGINT'}; {what}", file=sys.stderr)
  return 130
