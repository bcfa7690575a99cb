"""Measurement commands: engine and serving benchmarks, the load test, lmms-eval's POPE task."""
