"""Benchmarks: each module runs with one command and writes ``bench/results/<name>.json``."""
