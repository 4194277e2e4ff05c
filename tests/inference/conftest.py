"""Fixtures for the inference table. One chdb folder serves the whole session, owned by one process at a time.

A chdb folder is locked by the process that opens it. The writer's ClickHouse work runs in its own process, so
while a writer runs, this process must not hold the folder: read through `writer.query(sql)`, or close the writer
first and then open a short-lived client (`clickhouse` / `read_rows` below). Closing every client releases it.
"""

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from prometheus_client import CollectorRegistry

from gateway.inference import InferenceWriter, connect, migrate


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    # chdb opens one folder per process: every test in the run uses this same one.
    return f"chdb://{tmp_path_factory.getbasetemp() / 'chdb'}"


@pytest.fixture
def database() -> str:
    return f"lg_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def clickhouse(chdb_dsn: str, database: str) -> Iterator[Client]:
    """A migrated database and a client in this process: for tests that run no writer meanwhile."""
    client = connect(chdb_dsn)
    migrate(client, database)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.close()


@pytest.fixture
def read_rows(chdb_dsn: str) -> Callable[[str], list[tuple[Any, ...]]]:
    """Runs one query with a client opened and closed around it: only while no writer holds the folder."""

    def read(sql: str) -> list[tuple[Any, ...]]:
        client = connect(chdb_dsn)
        try:
            return client.query(sql).result_rows
        finally:
            client.close()

    return read


@pytest.fixture
def make_writer(chdb_dsn: str, database: str, tmp_path: Path) -> Iterator[Callable[..., InferenceWriter]]:
    """Writers on the session's chdb folder; closed (their processes ended) and their database dropped after."""
    writers: list[InferenceWriter] = []

    def make(dsn: str = chdb_dsn, **options: Any) -> InferenceWriter:
        options.setdefault("spool_dir", tmp_path / "spool")
        options.setdefault("registry", CollectorRegistry())
        writer = InferenceWriter(dsn, database, **options)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close(timeout=10)
    client = connect(chdb_dsn)
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.close()


@pytest.fixture
def refused_dsn() -> str:
    """An HTTP DSN on a loopback port nothing listens on: a ClickHouse server that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://default:secret@127.0.0.1:{port}"
