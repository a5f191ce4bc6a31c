import logging
import os
import tempfile

import pytest

# The CLI keeps credentials under XDG_CONFIG_HOME: keep the tests' out of the real home.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="marathon-test-config-")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
