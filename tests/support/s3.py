"""A local S3 server for tests and benches: moto in server mode on 127.0.0.1, and a proxy in front
of it that can be made to drop connections (a server that fails mid-write).

    with LocalS3() as s3:                 # `python -m moto.server` on a free port, stopped on exit
        s3.make_bucket("atkd")
        env = s3.env()                    # AWS_ENDPOINT_URL + dummy credentials, for subprocesses
        s3.apply_env()                    # the same in this process (s3fs reads them)

Clients reach it exactly as a real bucket (s3fs through `s3://bucket/prefix`); the only
difference is the endpoint. Nothing here leaves the loopback interface.

moto answers requests on several threads, and its conditional put checks "does the key
exist" and then stores without a lock (moto 5.2.6, s3/responses.py), so two racing
`If-None-Match: *` puts can both succeed there, which S3 itself rules out (seen: 2 of 50
rounds of 8 racing claimers had two winners). The server here runs moto's application
one request at a time (`serve`), which makes each request atomic as on S3; connections
are still served concurrently.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# Dummy credentials: moto accepts any. Tests check that they never reach a manifest or a log.
ACCESS_KEY = "AKIAATKDTESTKEY00000"
SECRET_KEY = "atkd-test-secret-never-logged-0000000000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """moto's S3 server on 127.0.0.1 (a subprocess of this one); see the module doc."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "LocalS3":
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.support.s3", str(self.port)],
                                      cwd=Path(__file__).parents[2], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).read()  # noqa: S310 - loopback only
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout:.0f}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a client process needs: the usual AWS variables, pointing at this server (or `endpoint`)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                # botocore would otherwise ask the EC2 metadata address for credentials when none are set
                "AWS_EC2_METADATA_DISABLED": "true"}

    def apply_env(self) -> None:
        os.environ.update(self.env())
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()  # instances made before would keep the old endpoint

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream_port` that forwards bytes both ways until
    told to fail: then it drops every open connection and refuses new ones (the server 'goes
    away' for the client), until `heal()`. `fail_after(n)`: fail once n more bytes went upstream,
    so a write can be cut in its middle."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._failing = False
        self._budget: int | None = None  # bytes upstream before failing
        self.bytes_up = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="flaky-proxy").start()

    def fail(self) -> None:
        with self._lock:
            self._failing = True
            conns, self._conns = self._conns, []
        for c in conns:
            _close(c)

    def fail_after(self, n_bytes: int) -> None:
        with self._lock:
            self._budget = n_bytes

    def heal(self) -> None:
        with self._lock:
            self._failing, self._budget = False, None

    def close(self) -> None:
        self._closed = True
        self.fail()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                failing = self._failing
            if failing:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        self.bytes_up += len(data)
                        if self._budget is not None:
                            self._budget -= len(data)
                            trip = self._budget <= 0
                        else:
                            trip = False
                    if trip:
                        self.fail()
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def serve(port: int) -> None:
    """moto's S3 server on 127.0.0.1:`port`, its application called one request at a time."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def one_at_a_time(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    run_simple("127.0.0.1", port, one_at_a_time, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
