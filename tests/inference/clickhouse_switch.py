"""A ClickHouse that a test takes down and brings back, seen from the writer process (so: state in files)."""

from dataclasses import dataclass
from pathlib import Path

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
