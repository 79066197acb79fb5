"""QoS benchmark: `python bench/qos.py --profile=cpu-tiny` (the same as `jaxmoe-bench`).

See jaxmoe/bench/qos/README.md for the profiles and what each system emulates.
"""

import pathlib
import sys

if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from jaxmoe.cli.bench import run

  run()
