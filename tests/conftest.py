import logging
import os
import tempfile

import pytest

pytest_plugins = ["tests.servers"]  # real PostgreSQL / Redis / etcd on loopback for the contract suites

# The CLI keeps credentials under XDG_CONFIG_HOME: keep the tests' out of the real home.
_CONFIG_HOME = os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="marathon-test-config-")


@pytest.fixture(scope="session", autouse=True)
def _remove_scratch_dirs():
    yield
    import shutil

    from tests.harness import SCRATCH

    for d in SCRATCH + [_CONFIG_HOME]:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
