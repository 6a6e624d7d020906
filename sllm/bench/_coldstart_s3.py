"""The cold-start benchmark's object store: moto's standalone S3 server on loopback.

`S3Server` starts `python -m sllm.bench._coldstart_s3 -H 127.0.0.1 -p PORT`,
which is `python -m moto.server` with one fix: moto answers a ranged GET by
reading the *whole* object into memory and slicing it, so every 16 MiB part
of a 1.2 GB checkpoint costs a 1.2 GB copy (measured: 15 MB/s for 8 parallel
16 MiB GETs). Real S3 serves a range in time proportional to the range, so
the patch reads just the requested bytes from moto's buffer. Everything else
(auth, headers, multipart uploads, listing) is moto's own code. Both our
invoker and the KServe-style baseline fetch through the same server.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sllm.store import StoreSettings

ACCESS_KEY = "bench"  # moto accepts any credentials
SECRET_KEY = "benchbench"
REGION = "us-east-1"
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_LISTENING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")  # werkzeug's start-up line


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """The patched moto server as a child process on loopback; a context manager.

    Without a `port` it binds port 0 (a free port, chosen by the kernel as it binds) and the
    port is read back from the server's start-up line: nothing can take it in between.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        module: str = __name__,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """`module` is run with `python -m`: this patched server, or stock "moto.server"."""
        self.port = port or 0
        self.module = module
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="sllm-moto-", suffix=".log", delete=False
        )

    @property
    def endpoint(self) -> str:
        """host:port of the server (its port is known once started)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://{self.endpoint}"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float | None = None) -> S3Server:
        """Start the server; wait (at most `timeout` seconds) until it answers HTTP."""
        timeout = self.start_timeout if timeout is None else timeout
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n{self.log()}")
            if not self.port:
                self._log.flush()
                match = _LISTENING.search(Path(self._log.name).read_bytes())
                if match is None:
                    time.sleep(0.1)
                    continue
                self.port = int(match[1])
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # it answered, which is all we wait for
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and remove its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=self.stop_timeout)
        self.proc = None
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def log(self) -> str:
        """What the server printed so far."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def settings(self) -> StoreSettings:
        """StoreSettings that reach this server (plain HTTP)."""
        return StoreSettings(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=REGION,
        )


def _patch_ranged_get() -> None:
    """Serve `Range: bytes=a-b` GETs by reading only those bytes (see the module docstring)."""
    from moto.s3.responses import S3Response

    whole_object_get = S3Response.get_object

    def get_object(self: Any) -> Any:
        match = _RANGE.fullmatch(self.headers.get("range") or "")
        if match is None or "partNumber" in self.querystring:
            return whole_object_get(self)
        key, not_modified = self._get_key()
        begin, end = int(match[1]), min(int(match[2]), key.size - 1)
        if not_modified or begin > end or self.headers.get("x-amz-checksum-mode"):
            return whole_object_get(self)
        with key.lock:
            key._value_buffer.seek(begin)
            body = key._value_buffer.read(end - begin + 1)
        headers = {**self._get_cors_headers_other(), **key.response_dict, **key.metadata}
        if key.version_id != "null":
            headers["x-amz-version-id"] = key.version_id
        headers["Accept-Ranges"] = "bytes"
        headers["content-range"] = f"bytes {begin}-{end}/{key.size}"
        headers["content-length"] = str(len(body))
        return 206, headers, body

    S3Response.get_object = get_object  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    """moto.server's entry point, with the ranged-GET fix applied first."""
    from moto.server import main as moto_main

    _patch_ranged_get()
    moto_main(argv)


if __name__ == "__main__":
    main()
