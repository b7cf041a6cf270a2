"""An S3 for tests: moto's server on 127.0.0.1, serving one request at a time.

AWS applies a conditional write (`If-None-Match`, `If-Match`) atomically; moto's threaded server checks
the condition and stores the object in two steps, so two racing requests could both pass. Served one at
a time (werkzeug without threads, HTTP/1.0: one connection per request) moto behaves like AWS there,
which the lease tests rely on. Import the `s3` fixture into a test module to use it:

    from moto_s3 import s3  # noqa: F401 - a fixture
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

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


@pytest.fixture(scope="module")
def s3():
    """A serialized moto S3 for the test module, with explicit endpoint and credentials."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield S3(endpoint, {"key": "testing", "secret": "testing",
                            "client_kwargs": {"endpoint_url": endpoint}})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
