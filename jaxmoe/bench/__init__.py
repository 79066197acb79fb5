"""Benchmark harnesses importable by the console scripts (the QoS harness); bench/ holds the scripts and results."""
