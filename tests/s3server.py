"""moto's S3 server on a fixed loopback port, shared by tests/test_storage.py and bench/chaos.py.

The port stays the same across a stop and a start, so stopping the server is a storage
outage that the clients (Ray's trials, the driver) see end when it starts again.
"""

from __future__ import annotations

import os
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on a fixed loopback port that can be stopped and started again (an outage)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        deadline = time.time() + 10
        while True:
            try:
                self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                self._server.start()
                return
            except OSError:  # the port may linger for a moment after a stop
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self._server.stop()


# Variables that would send an S3 client elsewhere than the loopback server.
FOREIGN_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION")


def s3_environment(endpoint: str, secret: str) -> dict[str, str]:
    """The standard AWS variables pointing every S3 client (boto3, s3fs, pyarrow) at `endpoint`."""
    return {
        "AWS_ACCESS_KEY_ID": "rayrec-test-key", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
