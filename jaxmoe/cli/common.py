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


def define_engine_flags() -> None:
  """The serving engine's flags, the same names on every entry point that runs an engine."""
  from jaxmoe.cli import mesh_flags  # noqa: F401  --mesh, --placement and the multi-host flags

  flags.DEFINE_enum(
    "mode",
    "mixed",
    ["swap", "resident", "mixed"],
    "swap: one backbone on the device, copied in on a tenant switch; resident: all backbones "
    "on the device; mixed: batches mix tenants.",
  )
  flags.DEFINE_integer("max_batch", 8, "Sequences decoded together.")
  define_max_seq_len()
  flags.DEFINE_float("max_wait_s", 1.0, "swap/resident: how long a tenant may wait before the batch switches to it.")
  flags.DEFINE_integer("page_size", 16, "Positions per KV-cache page.")
  flags.DEFINE_float("kv_cache_gb", None, "KV pages in 10^9 bytes (default: max_batch rows of max_seq_len).")
  flags.DEFINE_float(
    "expert_cache_gb",
    None,
    "Device bytes for experts in 10^9 (default: the whole pool on the device); the rest stay on the host "
    "and are copied in when routed.",
  )
  flags.DEFINE_float(
    "host_cache_gb",
    None,
    "Host bytes for experts in 10^9 (default: the whole pool in host memory); the rest are read from the "
    "store's files when needed. Needs --expert_cache_gb.",
  )
  flags.DEFINE_list("pinned_tenants", [], "With --expert_cache_gb: tenants whose experts are never evicted.")
  flags.DEFINE_bool(
    "overlap",
    True,
    "Dispatch each decode step before the previous one's tokens are read (one device without an expert "
    "cache; elsewhere steps run one at a time).",
  )
  define_moe_impl()
  define_verify_checksums()


def engine_config(store):
  """EngineConfig from the flags of `define_engine_flags` for `store` (its model bounds --max_seq_len's default)."""
  from jaxmoe.nn.moe import Impl
  from jaxmoe.serving import EngineConfig, Mode

  f = flags.FLAGS
  return EngineConfig(
    mode=Mode(f.mode),
    max_batch=f.max_batch,
    max_seq_len=max_seq_len(f.max_seq_len, store),
    max_wait_s=f.max_wait_s,
    impl=Impl(f.moe_impl),
    page_size=f.page_size,
    kv_cache_gb=f.kv_cache_gb,
    expert_cache_gb=f.expert_cache_gb,
    pinned_tenants=tuple(f.pinned_tenants),
    mesh=f.mesh,
    placement=f.placement,
    split_backbones=f.split_backbones,
    overlap=f.overlap,
  )


MESH_READ_CACHE_GB = 0.25  # on a mesh without --host_cache_gb: tensorstore's cache while each slot is read once


def load_store(path: str):
  """The store at `path` (verified unless --noverify_checksums). Its pool is read lazily from disk when
  --host_cache_gb bounds host memory, and always on a mesh, where each process then reads only the
  slots of its own devices (serving/mesh.py)."""
  import jaxmoe

  f = flags.FLAGS
  host_gb = f.host_cache_gb
  if f.mesh:
    host_gb = MESH_READ_CACHE_GB if host_gb is None else host_gb
  elif host_gb is not None and f.expert_cache_gb is None:
    raise ValueError("--host_cache_gb needs --expert_cache_gb (a pool read from disk is never all on the device)")
  return jaxmoe.load_store(path, verify_checksums=f.verify_checksums, host_cache_gb=host_gb)
