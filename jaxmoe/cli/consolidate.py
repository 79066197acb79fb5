"""jaxmoe-consolidate: K fine-tunes of one MoE base -> one store with a shared expert pool.

  jaxmoe-consolidate --tenant=chat=ckpts/chat --tenant=code=ckpts/code \\
      --tenant=math=ckpts/math --out=store --budget_gb=60
  jaxmoe-consolidate ... --share_fraction=0.5 --metric=output --calibration=wiki.txt --owner=medoid

Experts at the same (layer, expert index) are compared across tenants; the
closest are stored once and shared. At one position the tenants may split into
groups (three share one copy, the fourth keeps its own), found by complete-
linkage clustering under --metric. Bitwise-identical experts are always shared
(it changes no output). The store holds the pool, one backbone and one slot
map per tenant, store.json, report.json and similarity.png; load it with
jaxmoe.load_store(path).model(NAME). A bad input is one `error:` line (exit 1)
and writes nothing; SIGINT, SIGTERM and SIGHUP remove the partial store (exit
130), and a temporary left by a SIGKILL is removed by the next run for --out.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from jaxmoe.cli.common import (
  define_moe_impl,
  define_verify_checksums,
  interrupted,
  one_line_warnings,
  quiet_library_logs,
  terminate_like_interrupt,
)

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
  "tenant",
  [],
  "NAME=CHECKPOINT_DIR, repeated once per tenant (K >= 2, no upper limit): jaxmoe "
  "checkpoints of one architecture. NAME (1-64 of letters, digits, '.', '_', '-'; unique) names "
  "the tenant in the store and in requests.",
)
flags.DEFINE_string("out", None, "Store folder to create; must not exist (written atomically).")
flags.DEFINE_float(
  "budget_gb",
  None,
  "Budget for the shared expert POOL in GB (10^9 bytes): unique experts x bytes per "
  "expert <= budget. Backbones are not counted (report.json gives both). The closest experts are "
  "shared first until the pool fits; a budget below one expert per (layer, expert) is an error. "
  "Give exactly one of --budget_gb and --share_fraction.",
)
flags.DEFINE_float(
  "share_fraction",
  None,
  "F in [0, 1]: apply round(F x L x E x (K-1)) of the possible sharing "
  "steps, closest first; each step removes one expert from the pool. 0 shares only identical experts, "
  "1 keeps one expert per (layer, expert). With K = 2, F is the fraction of positions shared.",
)
flags.DEFINE_enum(
  "metric",
  "l2",
  ["l2", "cosine", "output"],
  "Expert distance: l2 on the flattened weights (the "
  "paper), cosine (1 - cosine similarity), or output (mean squared difference of the experts' "
  "outputs on the hidden states each tenant produces at that layer's MoE input on --calibration).",
)
flags.DEFINE_enum(
  "owner",
  "round_robin",
  ["round_robin", "base", "medoid", "average"],
  "Which weights a shared "
  "group keeps: round_robin (owner rotates with the position, the paper), base (--base_tenant's "
  "copy, or the member closest to it), medoid (the member closest to the others), average (the "
  "members' mean).",
)
flags.DEFINE_string("base_tenant", None, "Tenant NAME for --owner=base (default: the first --tenant).")
flags.DEFINE_string("calibration", None, "UTF-8 text FILE read by every tenant for --metric=output.")
flags.DEFINE_integer("calibration_tokens", 2048, "Tokens of --calibration used (rows of 256).")
define_moe_impl()
define_verify_checksums()

PROG = "jaxmoe-consolidate"


def _config():
  from jaxmoe.consolidate import ConsolidateConfig, Metric, Owner
  from jaxmoe.nn.moe import Impl

  text = None
  if FLAGS.calibration is not None:
    try:
      text = pathlib.Path(FLAGS.calibration).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"--calibration={FLAGS.calibration} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
      raise ValueError(f"--calibration={FLAGS.calibration}: cannot read ({e.strerror or e})") from None
  return ConsolidateConfig(
    metric=Metric(FLAGS.metric),
    owner=Owner(FLAGS.owner),
    budget_gb=FLAGS.budget_gb,
    share_fraction=FLAGS.share_fraction,
    base_tenant=FLAGS.base_tenant,
    calibration_text=text,
    calibration_tokens=FLAGS.calibration_tokens,
    impl=Impl(FLAGS.moe_impl),
  )


def main(argv) -> int:
  if len(argv) > 1:
    print(f"{PROG}: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 1
  quiet_library_logs()
  one_line_warnings(PROG)
  terminate_like_interrupt()
  from jaxmoe.consolidate import consolidate, report
  from jaxmoe.consolidate.tenants import parse_tenant

  try:
    if FLAGS.out is None:
      raise ValueError("--out=STORE is required")
    tenants = [parse_tenant(t) for t in FLAGS.tenant]
    header = consolidate(tenants, FLAGS.out, _config(), verify_checksums=FLAGS.verify_checksums)
  except (ValueError, OSError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    return interrupted(PROG, e, "no store was written")
  print(report.table(header))
  files = sorted(f.name for f in pathlib.Path(FLAGS.out).iterdir() if f.is_file())
  print(f"wrote {FLAGS.out} ({', '.join(files)})")
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
