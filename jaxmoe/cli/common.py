"""Helpers shared by the absl entry points."""

from __future__ import annotations

from absl import logging


def quiet_library_logs() -> None:
  """orbax logs every save and restore at INFO; entry points show warnings and up.

  An explicit --verbosity on the command line still wins.
  """
  from absl import flags

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
