"""Benchmarks run by `sllm bench`."""
