"""Flags of the entry points that serve on a mesh, and several hosts (jax.distributed)."""

from __future__ import annotations

from absl import flags

from jaxmoe.serving.placement import POLICIES

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "mesh",
  "",
  "Devices as axis:size pairs, e.g. 'data:2,expert:4' (axes: data, expert, model): the expert pool is "
  "sharded by slot over 'expert' and by each expert's hidden features over 'model' (which also splits "
  "attention and the LM head), the batch and the KV pages over 'data'. Empty: one device.",
)
flags.DEFINE_enum("placement", "round_robin", list(POLICIES), "On a mesh: which expert shard holds each pool slot.")
flags.DEFINE_bool(
  "split_backbones",
  False,
  "On a mesh: split attention (by head) and the LM head (by vocabulary) over the expert and model axes, "
  "instead of a whole copy of every backbone per device (implied by a model axis). Equal to one device up "
  "to float rounding (matmul kernels sum differently at other widths), not bit for bit.",
)
flags.DEFINE_string(
  "coordinator_address", None, "Several hosts: host:port of process 0's coordinator ($JAXMOE_COORDINATOR)."
)
flags.DEFINE_integer("num_processes", None, "Several hosts: processes in all, one per host ($JAXMOE_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Several hosts: this process's index, 0 serves ($JAXMOE_PROCESS_ID).")


def start_distributed() -> bool:
  """jax.distributed from the flags (or the environment); False for a single process."""
  from jaxmoe.serving import distributed

  return distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
