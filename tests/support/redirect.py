"""An addon script for a test gate in regular mode: its upstream connections to a provider's
real host go to the local mock instead, while the gate still sees, routes and governs that host.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT = """
class ToTheMock:
    def server_connect(self, data):
        if data.server.address and data.server.address[0] == {host!r}:
            data.server.address = ("127.0.0.1", {port})


addons = [ToTheMock()]
"""


def to_the_mock(folder: Path, host: str, mock_url: str) -> Path:
    """The script (give it to mitmdump with -s; the mock's certificate then needs
    `ssl_insecure`, as it is not the host's)."""
    path = folder / "to_the_mock.py"
    path.write_text(SCRIPT.format(host=host, port=int(mock_url.rsplit(":", 1)[1])), "utf-8")
    return path
