"""The controller as it runs in production: `sllm controller start`, gunicorn master and workers.

Metrics aggregated over workers, Knative's $PORT, slow clients, and the
errors gunicorn itself answers, all against a real process on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.controller import ADMIN_KEY, ControllerProcess
from tests.support.invoker import TOKEN
from tests.support.process import ServiceProcess

HEALTHZ_200 = 'sllm_controller_requests_total{endpoint="/healthz",status="200"}'


def sample(text: str, series: str) -> float:
    """The value of one series in a Prometheus text page (AssertionError when absent)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the metrics page:\n{text[:2000]}")


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, str, Any]:
    """Send raw bytes to the controller: the answer's status, content type and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    content_type = response.getheader("Content-Type") or ""
    return response.status, content_type, json.loads(body) if "json" in content_type else body


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    """A controller with one worker (32 threads), the default limits but a 30 s header timeout."""
    root = tmp_path_factory.mktemp("ctl-one-worker")
    ctl = ControllerProcess(
        f"sqlite:///{root / 'sllm.db'}",
        root,
        env={"SLLM_WORKERS": "1", "SLLM_HEADER_TIMEOUT": "30"},
    ).start()
    yield ctl
    ctl.stop()


# ---------------------------------------------------------------- metrics (item 1)
def test_metrics_count_requests_of_all_workers(tmp_path: Path, sqlite_url: str) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ctl = ControllerProcess(
        sqlite_url, tmp_path, env={"TMPDIR": str(tmp), "SLLM_WORKERS": "2"}
    ).start()
    try:
        assert len(list(tmp.glob("sllm-metrics-*"))) == 1
        for _ in range(12):  # a connection each, so both workers take some
            assert httpx.get(f"{ctl.url}/healthz").status_code == 200
        page = httpx.get(f"{ctl.url}/metrics")
        assert page.status_code == 200
        assert sample(page.text, HEALTHZ_200) == 12
    finally:
        ctl.stop()
    assert list(tmp.glob("sllm-metrics-*")) == []  # the server's folder goes with it


def test_metrics_folder_given_by_the_operator_is_wiped_at_start(
    tmp_path: Path, sqlite_url: str
) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left by an earlier run")
    ctl = ControllerProcess(
        sqlite_url, tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    ).start()
    try:
        assert not (folder / "counter_1.db").exists()
        assert httpx.get(f"{ctl.url}/healthz").status_code == 200
        assert sample(httpx.get(f"{ctl.url}/metrics").text, HEALTHZ_200) == 1
    finally:
        ctl.stop()
    assert folder.is_dir()  # the operator's folder stays


# ---------------------------------------------------------------- $PORT (item 2)
def test_listens_on_knative_port(tmp_path: Path, sqlite_url: str) -> None:
    """No --port and no SLLM_PORT: $PORT decides. PORT=0 binds a free port, so a controller
    that ignored $PORT would be found on its default (8700) instead."""
    env = {k: v for k, v in os.environ.items() if k != "SLLM_PORT"}
    env.update({"PORT": "0", "SLLM_INTERNAL_TOKEN": TOKEN, "SLLM_DATABASE_URL": sqlite_url})
    proc = ServiceProcess([sys.executable, "-m", "sllm", "controller", "start"], env, tmp_path)
    at = proc.args.index("--port")
    del proc.args[at : at + 2]  # keep only --port-file: where it listens comes from $PORT
    proc.start()  # waits for /readyz on the port it reports
    try:
        assert proc.port not in (0, 8700)
        assert httpx.get(f"{proc.url}/healthz").json() == {"status": "ok"}
    finally:
        proc.stop()


# ---------------------------------------------------------------- slow clients (item 18)
@pytest.mark.parametrize(
    "start",
    [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{",
    ],
    ids=["headers", "unauthenticated-bodies"],
)
def test_slow_clients_do_not_starve_the_controller(
    one_worker: ControllerProcess, start: bytes
) -> None:
    slow = []
    try:
        for _ in range(80):  # more than the worker's 32 threads
            sock = socket.create_connection(("127.0.0.1", one_worker.port), timeout=5)
            sock.sendall(start)  # and nothing more
            slow.append(sock)
        started = time.monotonic()
        r = httpx.get(f"{one_worker.url}/healthz", timeout=5)
        assert r.status_code == 200
        assert time.monotonic() - started < 5  # far below the 30 s header timeout
    finally:
        for sock in slow:
            sock.close()


def test_late_heads_and_bodies_answer_408(tmp_path: Path, sqlite_url: str) -> None:
    ctl = ControllerProcess(
        sqlite_url,
        tmp_path,
        env={"SLLM_WORKERS": "1", "SLLM_HEADER_TIMEOUT": "1", "SLLM_BODY_TIMEOUT": "1"},
    ).start()
    auth = f"Authorization: Bearer {ADMIN_KEY}\r\n".encode()
    cases = {
        "head": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        "head after a kept-alive request": (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo"
        ),
        "body": (
            b"POST /api/v1/namespaces/slow/keys HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"a": '
        ),
    }
    try:
        for name, data in cases.items():
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", ctl.port), timeout=10) as sock:
                sock.sendall(data)
                answer = sock.makefile("rb").read()  # to the close
            elapsed = time.monotonic() - started
            if name.startswith("head after"):
                assert answer.startswith(b"HTTP/1.1 200"), answer
            head, _, body = answer[answer.rfind(b"HTTP/1.1 ") :].partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), (name, answer)
            assert json.loads(body)["error"]["code"] == "request_timeout", name
            assert elapsed < 8, (name, elapsed)
    finally:
        ctl.stop()


# ---------------------------------------------------------------- gunicorn's own errors (item 25)
@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (
            # exactly one byte over the 64 KiB head limit, with no end in sight
            b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (64 * 1024 + 1 - 30),
            431,
            "request_header_fields_too_large",
        ),
    ],
    ids=["request-line", "http-version", "long-uri", "long-header", "head-over-limit"],
)
def test_gunicorn_errors_are_json(
    one_worker: ControllerProcess, data: bytes, status: int, code: str
) -> None:
    got, content_type, body = exchange(one_worker.port, data)
    assert (got, content_type) == (status, "application/json")
    assert body["error"]["code"] == code
    assert body["error"]["message"]


def test_kept_alive_connection_serves_request_after_request(one_worker: ControllerProcess) -> None:
    with one_worker.admin(timeout=10) as api:
        for i in range(10):
            assert api.get("/healthz").status_code == 200
            created = api.put(f"/api/v1/namespaces/kept-{i}", json={})
            assert created.status_code == 201, created.text
        assert {n["name"] for n in api.get("/api/v1/namespaces").json()} >= {"kept-0", "kept-9"}
