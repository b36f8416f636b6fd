"""TokenGate's scripts; also importable (`scripts.children`) by the tests and benchmarks."""
