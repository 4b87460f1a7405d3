"""Flow tests share ONE Prefect test harness (a temporary server and database) per session.

Prefect's ephemeral start-up costs seconds per process, so unit tests never import Prefect and
every flow test runs under this single harness, with results kept in a temp dir.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="kpod-prefect-results-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture()
def smoke_config():
    from tasks.config.pipeline import load_config

    return load_config(SMOKE)
