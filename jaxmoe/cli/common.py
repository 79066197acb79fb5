"""Helpers shared by the absl entry points."""

from __future__ import annotations

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
