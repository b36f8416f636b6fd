"""Addon tests: the addons inside mitmproxy's test harness (taddons / tflow), no processes."""
