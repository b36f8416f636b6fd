"""TokenGate's user tools, each a module with a `main()` behind a console script (pyproject.toml):
`tokengate-keys`, `tokengate-report`, `tokengate-capture` and `tokengate-mock`."""
