"""A real `redis-server` for the store benchmark and the tests, on a free loopback port.

It keeps its port across `stop()` and `start()`, so a test can take the store away and bring it
back.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tokengate_core.tools.children import Child

READY = 10.0  # seconds for the server to answer PING


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process without persistence; `password` makes it require AUTH, `tls`
    (a PEM file with a self-signed certificate and its key) makes it speak TLS only; `options`
    are more command-line options (a cluster node's)."""

    def __init__(
        self,
        executable: str = "redis-server",
        password: str | None = None,
        tls: Path | None = None,
        port: int | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.executable = executable
        self.password = password
        self.tls = tls
        self.port = port or free_port()
        self.options = list(options)
        self.process: Child | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [self.executable, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            for option in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
                argv += [option, str(self.tls)]
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = process = Child(argv + self.options)
        deadline = time.monotonic() + READY
        try:
            while not self.ping():
                if process.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{process.output}")
                time.sleep(0.02)
        except BaseException:
            self.stop()  # never leave a server behind
            raise
        return self

    def ping(self) -> bool:
        """True once the server answers (an AUTH error is an answer too)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                sock = raw
                if self.tls:
                    tls = ssl.create_default_context(cafile=self.tls)
                    sock = tls.wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def version(self) -> str:
        run = subprocess.run([self.executable, "--version"], capture_output=True, text=True)
        match = re.search(r"v=(\S+)", run.stdout)
        return match.group(1) if match else run.stdout.strip()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
