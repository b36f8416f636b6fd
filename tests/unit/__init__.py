"""Unit tests: the pure parts, stores against real servers included; no proxy, no mitmdump."""
