import uuid
from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from gateway.inference import connect, migrate


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One chdb engine per process: every test in the run must use this same folder.
    return f"chdb://{tmp_path_factory.getbasetemp() / 'chdb'}"


@pytest.fixture(scope="module")
def dashboard_database(chdb_dsn: str) -> Iterator[str]:
    """A database the plugin would query as its default one (its tables are not database-qualified)."""
    name = f"dash_{uuid.uuid4().hex[:10]}"
    admin = connect(chdb_dsn)
    migrate(admin, name)
    yield name
    admin.command(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


@pytest.fixture(scope="module")
def grafana_client(chdb_dsn: str, dashboard_database: str) -> Iterator[Client]:
    client = connect(chdb_dsn, database=dashboard_database)
    yield client
    client.close()
