"""The node gateway over TLS: nodes verify the orchestrator's certificate."""

from __future__ import annotations

import os
import subprocess

import pytest
import trio

from marathon.cli.serve import make_backend
from marathon.errors import ConnectionClosed, ProtocolError
from marathon.node.proxy import MeteringProxy
from marathon.node.service import NodeService
from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


def self_signed(directory: str, name: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_a_task_runs_over_a_tls_gateway_and_a_node_with_the_wrong_ca_is_refused():
    tmp = scratch_dir()
    cert, key = self_signed(tmp, "orchestrator")
    other, _ = self_signed(tmp, "someone-else")
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic([fa.text("over tls")]) as fake:
        config = marathon_config(
            os.path.join(tmp, "data"),
            anthropic_base_url=fake.url,
            gateway_listen="tls:127.0.0.1:0",
            gateway_tls_cert=cert,
            gateway_tls_key=key,
        )
        async with run_marathon(config) as mt:
            assert mt.gateway.startswith("tls:127.0.0.1:")
            final = await mt.finish((await mt.submit("hi", repo=repo))["id"])
            assert final["state"] == "succeeded" and final["final_text"] == "over tls"

            # a node that trusts another CA does not talk to this orchestrator
            bad = marathon_config(os.path.join(tmp, "bad-node"), orchestrator=mt.gateway, orchestrator_ca=other)
            svc = NodeService(bad, make_backend(bad), MeteringProxy("http://127.0.0.1:9", "k"), mt.node_secret)
            with pytest.raises(ProtocolError, match="TLS handshake"):
                await svc._session()
            # nor does one speaking plain TCP to it
            plain = marathon_config(os.path.join(tmp, "plain-node"), orchestrator=mt.gateway.replace("tls:", "tcp:"))
            svc = NodeService(plain, make_backend(plain), MeteringProxy("http://127.0.0.1:9", "k"), mt.node_secret)
            with pytest.raises((ProtocolError, ConnectionClosed)):
                with trio.fail_after(10):
                    await svc._session()
            assert (await mt.client.get("/healthz")).json()["nodes"] == 1
