"""Shell scripts, shims of the console scripts, and the benchmarks (`scripts.bench`)."""
