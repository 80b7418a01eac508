"""CPU benchmarks (pytest-benchmark); run with ``pytest bench/ --benchmark-only``. See README.md."""
