"""Connecting to ClickHouse (in-process chdb or a server) and creating or migrating the schema."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dashboards

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

SQL_DIR = Path(dashboards.__file__).resolve().parent / "sql"
CHDB_PREFIX = "chdb://"
# Settings every insert carries: a replayed batch is recognised by its token, in the roll-ups too.
DEDUP_SETTINGS = {"deduplicate_blocks_in_dependent_materialized_views": 1}


def is_embedded(dsn: str) -> bool:
    return dsn.startswith(CHDB_PREFIX)


def chdb_path(dsn: str) -> str:
    """The data folder of a chdb:// DSN: chdb:///abs/path is absolute, chdb://rel/path is relative to the cwd."""
    return dsn[len(CHDB_PREFIX):] or "."


def connect(dsn: str, database: str | None = None) -> Client:
    """A clickhouse-connect client for `chdb:///path` (embedded engine) or `http(s)://user:pass@host:port`."""
    # Imported here: the gateway's process imports this module (for the DSN checks) but talks to ClickHouse only
    # through the writer process.
    import clickhouse_connect

    if is_embedded(dsn):
        # clickhouse-connect reads chdb://a/b as location "a", database "b"; ours is always a folder path.
        path = chdb_path(dsn)
        os.makedirs(path, exist_ok=True)
        return clickhouse_connect.get_client(interface="chdb", path=path, database=database)
    return clickhouse_connect.get_client(
        dsn=dsn, database=database, connect_timeout=5, send_receive_timeout=30, autogenerate_session_id=False,
    )


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def migration_files() -> list[tuple[int, str, Path]]:
    files = []
    for path in sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        files.append((int(path.name[:3]), path.stem, path))
    return files


def migrate(client: Client, database: str, payload_ttl_days: int = 30, *, sole_writer: bool = False) -> list[str]:
    """Create the database and apply each not-yet-applied DDL file in order; returns the names applied.

    Idempotent and safe to run from several gateways at once: every statement is IF NOT EXISTS. `sole_writer` says
    nobody else inserts meanwhile (the embedded engine: this process holds its folder).
    """
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version"
    )
    applied = {row[0] for row in client.query(f"SELECT DISTINCT version FROM {database}.schema_migrations").result_rows}
    done = []
    for version, name, path in migration_files():
        if version in applied:
            continue
        sql = path.read_text().replace("{database}", database).replace("{payload_ttl_days}", str(payload_ttl_days))
        for statement in _statements(sql):
            client.command(statement)
        client.insert(f"{database}.schema_migrations", [[version, name]], column_names=["version", "name"])
        done.append(name)
    _apply_payload_ttl(client, database, payload_ttl_days)
    if done and sole_writer:
        _reload_views(client, database)
    return done


def _reload_views(client: Client, database: str) -> None:
    """Load the materialized views as the next start will, so that a batch retried then is deduplicated in them.

    ClickHouse (26.9) derives a view's dedup block ids differently for a view created or altered in this process
    (002's CREATE, 004's MODIFY QUERY) than for one loaded from disk: a batch written now whose ack was lost, and
    replayed by the next writer process, would be counted twice in the roll-ups. Only for a sole writer: an insert
    between DETACH and ATTACH would skip the view.
    """
    views = client.query(
        "SELECT name FROM system.tables WHERE database = {database:String} AND engine = 'MaterializedView'",
        parameters={"database": database},
    ).result_rows
    for (view,) in views:
        client.command(f"DETACH TABLE {database}.{view}")
        client.command(f"ATTACH TABLE {database}.{view}")


def _apply_payload_ttl(client: Client, database: str, days: int) -> None:
    """The payload TTL follows the policy after creation too, so shortening retention needs no manual ALTER."""
    ddl = client.command(f"SELECT create_table_query FROM system.tables WHERE database = '{database}' AND name = 'inference'")
    if f"toIntervalDay({days})" in str(ddl):
        return
    for column in ("request_payload", "response_payload"):
        client.command(
            f"ALTER TABLE {database}.inference MODIFY COLUMN {column} String CODEC(ZSTD(3)) "
            f"TTL toDateTime(ts) + toIntervalDay({days})"
        )
