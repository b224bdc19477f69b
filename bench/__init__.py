"""Benchmark: wsechod against the websockets deployment-docs example, in one run."""
