"""moto's S3 server as an object-store staging area: the server, a boto3 client and the Airflow connection."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@contextmanager
def running_moto() -> Iterator[tuple[str, int]]:
    """Run moto's S3 server on a free loopback port; yield its host and port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    """Return a boto3 S3 client for the server at ``endpoint``."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )


def aws_connection(endpoint: str) -> str:
    """Return an ``AIRFLOW_CONN_*`` value (JSON) for an AWS connection to ``endpoint``."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": ACCESS_KEY,
            "password": SECRET_KEY,
            "extra": {"endpoint_url": endpoint, "region_name": REGION},
        }
    )
