"""Benchmarks: ``python -m bench.chat_fanout`` (see bench/README.md)."""
