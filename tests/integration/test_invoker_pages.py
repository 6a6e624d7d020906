"""An admin reads invokers' own pages (metrics, status) through the controller.

Invokers answer only with the internal token, which the embedded server never
shows: these routes are how its user (an admin key) sees them.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.controller import (
    ControllerThread,
    client,
    registered_invoker,
    wait_for_invokers,
)

# Invokers are named HOST:PORT by default: a name that is no DNS label still has pages.
NAME = "gpu-1.example:8701"


def test_admin_reads_invoker_metrics_and_status(tmp_path: Path, sqlite_url: str) -> None:
    ctl = ControllerThread(sqlite_url).start()
    inv = registered_invoker(tmp_path / "inv", (tmp_path / "store").as_uri(), ctl.url, NAME)
    try:
        inv.start()
        admin = ctl.admin()
        wait_for_invokers(admin, 1)

        metrics = admin.get(f"/api/v1/invokers/{NAME}/metrics")
        assert metrics.status_code == 200, metrics.text
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'sllm_invoker_tier_capacity_bytes{tier="dram"}' in metrics.text
        status = admin.get(f"/api/v1/invokers/{NAME}/status")
        assert status.status_code == 200, status.text
        assert "dram" in status.json()["tiers"]

        for path in ("/api/v1/invokers/nobody/metrics", f"/api/v1/invokers/{NAME}/secrets"):
            missing = admin.get(path)
            assert missing.status_code == 404, path
            assert missing.json()["error"]["code"] == "not_found"

        assert admin.put("/api/v1/namespaces/plain").status_code == 201
        key = admin.post("/api/v1/namespaces/plain/keys", json={"label": "t"}).json()["key"]
        refused = client(ctl.url, key).get(f"/api/v1/invokers/{NAME}/metrics")
        assert refused.status_code == 403

        inv.stop()
        gone = admin.get(f"/api/v1/invokers/{NAME}/status")
        assert gone.status_code == 503
        assert gone.json()["error"]["code"] == "invoker_lost"
    finally:
        inv.stop()
        ctl.stop()
