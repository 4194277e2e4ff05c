import socket
import uuid
from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from gateway.inference import connect, migrate


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One chdb engine per process: every test in the run must use this same folder.
    return f"chdb://{tmp_path_factory.getbasetemp() / 'chdb'}"


@pytest.fixture
def database() -> str:
    return f"lg_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def clickhouse(chdb_dsn: str, database: str) -> Iterator[Client]:
    client = connect(chdb_dsn)
    migrate(client, database)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.close()


@pytest.fixture
def refused_dsn() -> str:
    """An HTTP DSN on a loopback port nothing listens on: a ClickHouse server that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://default:secret@127.0.0.1:{port}"
