"""jaxmoe-bench: the QoS benchmark (turnaround, TTFT, throughput vs a MIG-style partition).

  jaxmoe-bench --profile=cpu-tiny                      # <= 3 min on 2 CPU cores
  jaxmoe-bench --profile=gpu-mixtral8                  # one GPU (H100/H200 class)
  jaxmoe-bench --profile=gpu-mixtral32-single          # one 141 GB GPU
  jaxmoe-bench --profile=gpu-mixtral8 --dry_run        # the same code at tiny widths, any machine

Writes results.json, CSV tables, PNG plots and a README under
bench/results/<profile>/ (--out_dir to change; dry runs default to a
temporary folder). Profiles: `jaxmoe.bench.qos.profiles`; how every system is
emulated: jaxmoe/bench/qos/README.md.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import tempfile

from absl import app, flags

from jaxmoe.cli.common import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", "cpu-tiny", "Benchmark profile: cpu-tiny, gpu-mixtral8 or gpu-mixtral32-single.")
flags.DEFINE_string("out_dir", None, "Output folder (default bench/results/<profile>).")
flags.DEFINE_bool(
  "dry_run",
  False,
  "Run the profile at tiny widths with short traces (checks it builds and "
  "runs, on any machine); results go to a temporary folder unless --out_dir is given.",
)
flags.DEFINE_list("systems", None, "Subset of systems to run (default: the profile's; 'single' is always run).")
flags.DEFINE_string("compile_cache_dir", None, "Persistent XLA compilation cache folder (recommended on GPU).")
flags.DEFINE_float(
  "expert_cache_gb",
  None,
  "Device bytes for experts (10^9) in every jaxmoe system (default: the whole pool on the device); "
  "the MIG baseline keeps its own 1/K share of the budget.",
)
flags.DEFINE_bool("allow_cpu", False, "Run a GPU profile on a machine without a GPU (slow; for debugging).")


CPU_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def single_threaded_cpu() -> None:
  """XLA's CPU backend on one thread, so a lane's CPU time is its work (driver.Timer.PROCESS_CPU).

  Read when the backend starts: call before anything touches a device.
  """
  flags_now = os.environ.get("XLA_FLAGS", "")
  if CPU_SINGLE_THREAD not in flags_now:
    os.environ["XLA_FLAGS"] = f"{flags_now} {CPU_SINGLE_THREAD}".strip()


def default_out_dir(name: str, dry_run: bool) -> pathlib.Path:
  if dry_run:
    return pathlib.Path(tempfile.gettempdir()) / "jaxmoe-bench" / name
  return pathlib.Path("bench") / "results" / name


def main(argv) -> int:
  del argv
  quiet_library_logs()
  import jax

  from jaxmoe.bench.qos import profiles, runner
  from jaxmoe.bench.qos.driver import Timer

  try:
    profile = profiles.get(FLAGS.profile)
  except KeyError as e:
    print(f"jaxmoe-bench: {e.args[0]}", file=sys.stderr)
    return 2
  if FLAGS.dry_run:
    profile = profiles.dry_run(profile)
  if FLAGS.expert_cache_gb is not None:
    profile = dataclasses.replace(
      profile, serve=dataclasses.replace(profile.serve, expert_cache_gb=FLAGS.expert_cache_gb)
    )
  if profile.platform == "cpu" and getattr(profile, "timer", None) is Timer.PROCESS_CPU:
    single_threaded_cpu()
  if FLAGS.compile_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache_dir)
  if profile.platform == "gpu" and jax.default_backend() != "gpu" and not FLAGS.allow_cpu:
    print(
      f"jaxmoe-bench: profile {profile.name} needs a GPU (backend here: {jax.default_backend()}); "
      f"--dry_run runs it at tiny widths on any machine",
      file=sys.stderr,
    )
    return 2
  out_dir = pathlib.Path(FLAGS.out_dir) if FLAGS.out_dir else default_out_dir(profile.name, FLAGS.dry_run)
  prog = pathlib.Path(sys.argv[0]).name
  command = " ".join([prog if prog == "jaxmoe-bench" else f"python {sys.argv[0]}", *sys.argv[1:]])
  try:
    doc = runner.run_profile(profile, out_dir, command, FLAGS.systems)
  except ValueError as e:  # a bad --systems list, a partition budget too small for a backbone
    print(f"jaxmoe-bench: {e}", file=sys.stderr)
    return 2
  print(runner.format_headline(doc))
  print(f"results: {out_dir}")
  return 0


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
