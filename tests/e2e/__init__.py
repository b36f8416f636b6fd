"""End-to-end tests: a real mitmdump, the mock provider, Redis and the tools as processes."""
