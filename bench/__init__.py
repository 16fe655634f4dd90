"""Benchmarks, run on demand (not part of the test suite): ``python bench/<name>.py --help``."""
