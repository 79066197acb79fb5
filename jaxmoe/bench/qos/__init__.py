"""QoS benchmark harness: jaxmoe's serving modes against a MIG-style partition and full-model swap.

  workload.py      per-tenant Poisson arrivals, Zipf popularity, length profiles
  driver.py        the open-loop discrete-event driver and its lane clocks
  hoststore.py     K synthetic fine-tunes in host memory, loaded per system
  systems.py       single model, jaxmoe swap / resident / mixed, full-model swap
  mig.py           the MIG-style static partition (emulation stated exactly there)
  metrics.py       latency percentiles, throughput, capacity, headline ratios
  report.py        results.json, CSV, PNG plots, README
  profiles.py      cpu-tiny, gpu-mixtral8, gpu-mixtral32-single (exact-name registry)
  runner.py        runs a QoS profile; decode_bench.py runs the decode profile
  cli.py           jaxmoe-bench (absl flags)

How to run each profile and how each system is emulated: README.md here.
"""
