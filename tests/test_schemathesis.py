"""schemathesis against the running API: every check, every phase (examples, coverage,
fuzzing, stateful), no failures.

A live orchestrator (``--role orchestrator``: no node, so submitted tasks stay queued and the
run costs no sandboxes) with its local administrator's API key; the document is the server's
own /v1/openapi.json.  The run is bounded: a few examples per operation, a short request
timeout (an event stream that follows a queued task ends at the timeout), two workers.
Settings that are not the defaults are in tests/schemathesis.toml, each with its reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from tests.harness import marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow  # a few minutes of generated requests: make test runs it, test-fast does not

MAX_EXAMPLES = 8  # per operation and phase: ~30 operations, a few minutes on 2 cores
CONFIG = Path(__file__).with_name("schemathesis.toml")


def schemathesis_bin() -> str:
    path = Path(sys.executable).with_name("schemathesis")
    if not path.exists():
        raise RuntimeError(f"schemathesis is not installed in {path.parent}: run `make venv` (it is a dev dependency)")
    return str(path)


async def test_schemathesis_finds_no_failure_against_the_live_api():
    tmp = scratch_dir()
    config = marathon_config(
        os.path.join(tmp, "data"),
        # what the fuzzer's volume would trip: limits are tested elsewhere (test_auth, test_login_throttle)
        submit_rate=1_000_000.0,
        submit_burst=1_000_000,
        login_account_failures=1_000_000,
        login_client_failures=1_000_000,
        register_attempts=1_000_000,
    )
    async with run_marathon(config, role="orchestrator") as mt:
        key = mt.client.headers["Authorization"][len("Bearer ") :]
        # something for the operations that read a task to find
        await mt.submit("a queued task for the fuzzer to read")
        report = os.path.join(tmp, "report")
        with trio.fail_after(900):
            res = await trio.run_process(
                [
                    schemathesis_bin(),
                    "--config-file",
                    str(CONFIG),
                    "run",
                    f"{mt.url}/v1/openapi.json",
                    "--checks",
                    "all",
                    "--phases",
                    "examples,coverage,fuzzing,stateful",
                    "--header",
                    f"Authorization: Bearer {key}",
                    "--max-examples",
                    str(MAX_EXAMPLES),
                    "--workers",
                    "2",
                    "--request-timeout",
                    "6",
                    "--seed",
                    "20261202",
                    "--no-color",
                    "--report",
                    "junit",
                    "--report-dir",
                    report,
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
                cwd=tmp,
            )
        out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
        assert res.returncode == 0, out[-20000:]
        assert "Stateful" in out and "API Links" in out, out[-5000:]  # the stateful phase ran
        # the credentials survived the run (nothing the fuzzer did revoked them)
        assert (await mt.client.get("/v1/auth/whoami")).status_code == 200
