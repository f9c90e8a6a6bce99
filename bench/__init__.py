"""Benchmarks: each writes bench/results/<name>.json with figures measured side by side in one run."""
