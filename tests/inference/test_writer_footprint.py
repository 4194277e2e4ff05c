"""What each process of the inference table loads: the writer process holds the ClickHouse driver, and the chdb
engine only for a chdb:// DSN; the gateway's process holds neither.

The writer process is observed from outside, through the native libraries mapped into it: each package below
maps its compiled core when it is imported.
"""

import json
import subprocess
import sys
from pathlib import Path

import psutil

from tests.inference.records import count_rows, make_record

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = {
    "chdb": "/chdb/_chdb.",
    "numpy": "/numpy/_core/_multiarray_umath.",
    "pandas": "/pandas/_libs/",
    "pyarrow": "/pyarrow/lib.",
    "aiohttp": "/aiohttp/_http_parser.",
    "uvloop": "/uvloop/loop.",
    "pydantic": "/pydantic_core/_pydantic_core.",
    "tiktoken": "/tiktoken/_tiktoken.",
    "regex": "/regex/_regex.",
    "spacy": "/spacy/",
}


def loaded(pid: int) -> set[str]:
    paths = {mapping.path for mapping in psutil.Process(pid).memory_maps()}
    return {name for name, fragment in LIBRARIES.items() if any(fragment in path for path in paths)}


def test_a_server_dsn_writer_process_spools_without_chdb_or_the_gateways_stack(make_writer, refused_dsn: str) -> None:
    writer = make_writer(refused_dsn, flush_interval_ms=50)
    writer.start()
    for _ in range(5):
        writer.submit(make_record())
    assert writer.flush(timeout=60)
    assert writer.spool.rows == 5
    assert writer.pid is not None
    assert loaded(writer.pid) == set()


def test_a_chdb_writer_process_loads_the_engine_and_no_dataframe_libraries(make_writer) -> None:
    writer = make_writer(flush_interval_ms=50)
    writer.start()
    for _ in range(5):
        writer.submit(make_record())
    assert writer.flush(timeout=60)
    assert count_rows(writer) == (5, 5)
    assert writer.pid is not None
    assert loaded(writer.pid) == {"chdb"}


def test_the_gateways_process_loads_no_clickhouse_driver() -> None:
    script = (
        "import json, sys\n"
        "import gateway.app, gateway.cli\n"
        "from gateway.inference import InferenceWriter, migrate\n"
        "print(json.dumps(sorted(name for name in ('clickhouse_connect', 'chdb') if name in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
