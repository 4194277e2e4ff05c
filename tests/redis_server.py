"""A real redis-server on a loopback port, started and stopped by the tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a loopback port; stop() and start() simulate an outage."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """The server stops answering but keeps its sockets open, like a hung or partitioned host."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


def _start(folder: Path) -> RedisServer:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
    server = RedisServer(folder)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that take it down."""
    server = _start(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


class RedisCluster:
    """Three redis-server masters in cluster mode joined by `redis-cli --cluster create`, started by the tests."""

    def __init__(self, folder: Path, size: int = 3) -> None:
        self.folder = folder
        self.ports: list[int] = []
        # Each node's cluster bus gets a port of its own (the default, port + 10000, may be taken or past 65535).
        self.bus_ports: dict[int, int] = {}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        while len(self.ports) < size:
            port, bus = free_port(), free_port()
            if port != bus and {port, bus}.isdisjoint(self.ports + list(self.bus_ports.values())):
                self.ports.append(port)
                self.bus_ports[port] = bus

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=10)

    def start_node(self, port: int) -> None:
        self.processes[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf", "--cluster-port", str(self.bus_ports[port]),
             "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        for _ in range(250):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {port} did not start")

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{port}" for port in self.ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, timeout=120,
        )
        self.wait_ok()

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every running node says cluster_state:ok and they all agree on who serves every slot."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                views = set()
                for port in self.processes:
                    client = self.client(port)
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        raise redis.RedisError("not ok yet")
                    views.add(tuple(sorted((r[0], r[1], r[2][1]) for r in client.execute_command("CLUSTER", "SLOTS"))))
                if len(views) == 1 and sum(end - start + 1 for start, end, _ in next(iter(views))) == 16384:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def add_replica(self, master: int) -> int:
        """Starts one more node and makes it a replica of `master`; returns its port once it is in sync."""
        port, bus = free_port(), free_port()
        self.ports.append(port)
        self.bus_ports[port] = bus
        self.start_node(port)
        subprocess.run(
            ["redis-cli", "--cluster", "add-node", f"127.0.0.1:{port}", f"127.0.0.1:{master}", "--cluster-slave",
             "--cluster-master-id", self.node_id(master)],
            check=True, stdout=subprocess.DEVNULL, timeout=120,
        )
        deadline = time.monotonic() + 60
        while self.client(port).info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica on port {port} did not sync")
            time.sleep(0.1)
        self.wait_ok()
        return port

    def node_id(self, port: int) -> str:
        return self.client(port).execute_command("CLUSTER", "MYID").decode()

    def owner(self, key: bytes) -> int:
        """The port of the master that serves `key`'s slot."""
        slot = key_slot(key)
        for start, end, master, *_ in self.client(next(iter(self.processes))).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise RuntimeError(f"no node serves slot {slot}")

    def begin_move(self, slot: int, source: int, target: int) -> None:
        self.client(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))

    def migrate_keys(self, slot: int, source: int, target: int) -> None:
        client = self.client(source)
        while keys := client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            client.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)

    def finish_move(self, slot: int, target: int) -> None:
        owner = self.node_id(target)
        for port in [target, *[p for p in self.processes if p != target]]:
            self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)
        self.wait_ok()

    def move(self, slot: int, source: int, target: int) -> None:
        """Reshards one slot as `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE its keys, SETSLOT NODE."""
        self.begin_move(slot, source, target)
        self.migrate_keys(slot, source, target)
        self.finish_move(slot, target)

    def stop_node(self, port: int) -> None:
        process = self.processes.pop(port)
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait()

    def flush(self) -> None:
        """Empties every node, and ends a move a failed test left half done."""
        for port in self.processes:
            client = self.client(port)
            mine = next(line for line in client.execute_command("CLUSTER", "NODES").decode().splitlines() if "myself" in line)
            for moving in [part for part in mine.split() if part.startswith("[")]:
                client.execute_command("CLUSTER", "SETSLOT", int(moving[1:].split("-")[0]), "STABLE")
            client.flushall()

    def stop(self) -> None:
        for port in list(self.processes):
            self.stop_node(port)


def _start_cluster(folder: Path) -> RedisCluster:
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: `make test` installs it (Debian's redis-server brings redis-cli)")
    cluster = RedisCluster(folder)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = _start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of the test's own, for tests that take a node down."""
    cluster = _start_cluster(tmp_path)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> str:
    redis_cluster.flush()
    return redis_cluster.url
