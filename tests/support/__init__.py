"""Helpers the test suites share (not tests): processes, harness, quotas text, captures."""
