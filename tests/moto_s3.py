"""An S3 for tests: moto's server on 127.0.0.1.

`moto_server(serial=...)` starts one and yields its endpoint. AWS applies a conditional write
(`If-None-Match`, `If-Match`) atomically; moto's threaded server checks the condition and stores the
object in two steps, so two racing requests could both pass. Served one at a time (`serial=True`:
werkzeug without threads, HTTP/1.0, one connection per request) moto behaves like AWS there, which the
lease tests rely on; the pipeline's own S3 tests use the threaded `moto_server` command. Import the `s3`
fixture into a test module to use the serial one:

    from moto_s3 import s3  # noqa: F401 - a fixture
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

_SERVE = """
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False,
           request_handler=MotoRequestHandler)
"""


@dataclass(frozen=True)
class S3:
    endpoint: str
    storage_options: dict

    def new_bucket(self) -> str:
        """A fresh bucket; returns its name."""
        import s3fs

        name = f"grit-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.storage_options).mkdir(name)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(serial: bool) -> Iterator[str]:
    """A moto S3 server on a free loopback port for the duration of the block; yields its endpoint URL."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = _free_port()
    if serial:
        cmd = [sys.executable, "-c", _SERVE, str(port)]
    else:
        cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3():
    """A serialized moto S3 for the test module, with explicit endpoint and credentials."""
    with moto_server(serial=True) as endpoint:
        yield S3(endpoint, {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}})
