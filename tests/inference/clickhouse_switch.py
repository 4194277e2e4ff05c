"""A ClickHouse that a test takes down and brings back, seen from the writer process (so: state in files)."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from gateway.inference import connect


@dataclass
class SwitchableClickHouse:
    """Connects to a refused loopback port while `down`, to the real chdb engine otherwise; counts attempts.

    It is pickled into the writer process, so its state lives in files the test and that process both see.
    """

    up_dsn: str
    down_dsn: str
    folder: Path

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "down").touch()

    @property
    def down(self) -> bool:
        return (self.folder / "down").exists()

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            (self.folder / "down").touch()
        else:
            (self.folder / "down").unlink(missing_ok=True)

    @property
    def attempts(self) -> int:
        path = self.folder / "attempts"
        return path.stat().st_size if path.exists() else 0

    def __call__(self) -> Client:
        with open(self.folder / "attempts", "ab") as attempts:
            attempts.write(b".")
        return connect(self.down_dsn if self.down else self.up_dsn)


@dataclass
class SlowClickHouse:
    """The real chdb engine, each insert into the inference table taking `delay_s` longer; their row counts are
    appended to `inserts`, one line each (the writer process does the inserting, so the record is a file)."""

    dsn: str
    inserts: Path
    delay_s: float

    def __call__(self) -> Client:
        return _SlowClient(connect(self.dsn), self)

    def insert_rows(self) -> list[int]:
        return [int(line) for line in self.inserts.read_text().split()] if self.inserts.exists() else []


class _SlowClient:
    def __init__(self, client: Client, clickhouse: SlowClickHouse) -> None:
        self._client = client
        self._clickhouse = clickhouse

    def insert(self, table: str, data: Any, *args: Any, **kwargs: Any) -> Any:
        if table.endswith(".inference"):
            time.sleep(self._clickhouse.delay_s)
            with open(self._clickhouse.inserts, "a") as inserts:
                inserts.write(f"{len(data[0])}\n")
        return self._client.insert(table, data, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
