"""A real local Redis Cluster for the store benchmark and the tests, on free loopback ports.

`redis-server --cluster-enabled yes` nodes in a temporary folder, joined by `redis-cli --cluster
create` (masters, and replicas when asked for), ready once every node says `cluster_state:ok`.
A node keeps its port and its `nodes.conf` across `stop()` and `start()`, so a killed master
comes back as a replica of the node promoted in its place.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from scripts.bench.redis_server import RedisServer

BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000
NODE_TIMEOUT_MS = 2000  # how long a master may be unreachable before its replica takes over
READY = 30.0  # seconds for the cluster to be formed and every node to say it is ok


def cluster_port() -> int:
    """A loopback port free together with its bus port (port + 10000)."""
    for _ in range(200):
        port = random.randrange(20_000, 65_536 - BUS_OFFSET)
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


class LocalCluster:
    """`masters` masters with `replicas` replicas each, without persistence."""

    def __init__(
        self,
        server: str = "redis-server",
        cli: str = "redis-cli",
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.cli = cli
        self.replicas = replicas
        self.folder = Path(tempfile.mkdtemp(prefix="tokengate-cluster-"))
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            port = cluster_port()
            folder = self.folder / str(port)
            folder.mkdir()
            options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-node-timeout", str(node_timeout_ms),
                       "--dir", str(folder)]  # fmt: skip
            self.nodes.append(RedisServer(server, port=port, options=options))

    @property
    def url(self) -> str:
        """A seed: the first node (the client learns the others from it)."""
        return self.nodes[0].url

    def start(self) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            create = [self.cli, "--cluster", "create", *addresses,
                      "--cluster-replicas", str(self.replicas), "--cluster-yes"]  # fmt: skip
            run = subprocess.run(create, capture_output=True, text=True, timeout=READY)
            if run.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{run.stdout}{run.stderr}")
            self.wait_ok()
        except BaseException:
            self.stop()  # never leave nodes behind
            raise
        return self

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=1, decode_responses=True)

    def info(self, node: RedisServer) -> dict[str, str]:
        """The node's CLUSTER INFO, or {} when it does not answer."""
        try:
            with self.client(node) as client:
                text = client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return {}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def wait_ok(self, timeout: float = READY) -> None:
        """Until every running node says `cluster_state:ok` and knows every node, and every
        replica is in sync with its master (a replica that never was cannot take over)."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [self.info(node) for node in self.running()]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_known_nodes") == str(len(self.nodes))
                for info in infos
            ) and all(map(self.in_sync, self.running())):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok after {timeout} s: {infos}")
            time.sleep(0.05)

    def in_sync(self, node: RedisServer) -> bool:
        """A master, or a replica whose link to its master is up."""
        try:
            with self.client(node) as client:
                replication = client.info("replication")
        except redis.RedisError:
            return False
        return replication["role"] == "master" or replication.get("master_link_status") == "up"

    def master_of(self, slot: int) -> RedisServer:
        """The running node that serves `slot` now, as the other nodes see it."""
        for node in self.running():
            try:
                with self.client(node) as client:
                    ranges = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            for first, last, master, *_ in ranges:
                if first <= slot <= last:
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise RuntimeError(f"no node answers for slot {slot}")

    def masters(self) -> list[RedisServer]:
        return [n for n in self.running() if self.role(n) == "master"]

    def role(self, node: RedisServer) -> str | None:
        try:
            with self.client(node) as client:
                return client.execute_command("ROLE")[0]
        except redis.RedisError:
            return None

    def flush(self) -> None:
        """Empty every master (the replicas follow)."""
        for node in self.masters():
            with self.client(node) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
