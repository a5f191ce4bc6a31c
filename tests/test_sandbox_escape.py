"""The sandbox-escape suite: a scripted task probes its sandbox as Claude Code's Bash tool
would (tests/sandbox_probe.py) — every /proc/*/environ and cmdline for secrets, nested user
namespaces, io_uring, the keyring, the host's /etc and /opt, the node's data dir, another
running task's workspace, the agent socket, the orchestrator's ports — and every probe must
be denied.  For a root node (in this process) and a node that is not root (its own process,
another uid)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager

import pytest
import trio

from tests import fake_anthropic as fa
from tests.polling import until
from tests.harness import (
    REPO_ROOT,
    TEST_KEY,
    claude_bin,
    make_git_repo,
    marathon_config,
    run_marathon,
    scratch_dir,
)

pytestmark = pytest.mark.slow
PROBE = (REPO_ROOT / "tests" / "sandbox_probe.py").read_text()
GH_TOKEN = "ghp_" + secrets.token_hex(18)
SETTING = "marathon-setting-" + secrets.token_hex(12)
NONROOT_UID = 43210


def host_ips() -> list[str]:
    ips: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ips.add(str(info[4][0]))
    except OSError:
        pass
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            ips.add(parts[parts.index("inet") + 1].split("/")[0])
    return sorted(str(ip) for ip in ips if not str(ip).startswith("127."))


def probe_turn(cfg: dict) -> fa.Turn:
    cmd = f"cat > /tmp/probe.py <<'PROBE_EOF'\n{PROBE}\nPROBE_EOF\necho '{json.dumps(cfg)}' | python3 /tmp/probe.py"
    return fa.tool_use("Bash", {"command": cmd, "description": "probe the sandbox", "timeout": 300000})


def probe_result(fake) -> dict:
    """The probe's JSON, from the tool result Claude Code sent back upstream (whole, not summarised)."""
    for r in reversed(fake.requests):
        body = r.body if isinstance(r.body, dict) else {}
        for msg in body.get("messages", []):
            content = msg.get("content")
            if not isinstance(content, list):
                continue
            for block in content:
                if block.get("type") != "tool_result":
                    continue
                parts = block.get("content")
                text = parts if isinstance(parts, str) else " ".join(p.get("text", "") for p in parts or [])
                if "PROBE-RESULT " in text:
                    return json.loads(text.split("PROBE-RESULT ", 1)[1].splitlines()[0])
    raise AssertionError("the probe printed no result")


def assert_all_denied(result: dict) -> None:
    failed = {k: v["detail"] for k, v in result.items() if not v["denied"]}
    assert not failed, f"sandbox probes that got through: {json.dumps(failed, indent=1)}"
    assert len(result) >= 25, sorted(result)


def plant_opt_secret() -> tuple[str, str]:
    """A world-readable key under the host's /opt, as apps leave them."""
    secret = "opt-secret-" + secrets.token_hex(12)
    d = f"/opt/marathon-probe-{secrets.token_hex(4)}"
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, ".env"), "w") as f:
        f.write(f"API_KEY={secret}\n")
    os.chmod(os.path.join(d, ".env"), 0o644)
    return d, secret


def enc(values) -> list[str]:
    return [base64.b64encode(v.encode()).decode() for v in values]


def runtime_paths_for_probe() -> list[str]:
    from marathon.node.sandbox.process import runtime_paths

    return runtime_paths()


async def test_root_node_sandbox_denies_every_probe(monkeypatch):
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    opt_dir, opt_secret = plant_opt_secret()
    monkeypatch.setenv("GITHUB_TOKEN", GH_TOKEN)  # what a careless operator's node environment holds
    monkeypatch.setenv("MARATHON_PROBE_SETTING", SETTING)
    other_started = trio.Event()
    cfg_holder: dict = {}

    def script(body, i):
        prompt = json.dumps(body["messages"][0]["content"])
        if "other task" in prompt:  # task A: a marker in its workspace, then it waits
            if i == 0:
                return fa.tool_use("Bash", {"command": "echo OTHER-TASK-MARKER > marker.txt"})
            other_started.set()
            return fa.hang()
        return [probe_turn(cfg_holder["cfg"]), fa.text("probed")][i]

    try:
        async with fa.open_fake_anthropic(script) as fake:
            config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, slots=2)
            async with run_marathon(config) as mt:
                r = await mt.client.put("/v1/auth/github-token", json={"token": GH_TOKEN})
                assert r.status_code == 200, r.text
                other = await mt.submit("other task", repo=repo)
                with trio.fail_after(60):
                    await other_started.wait()
                other_ws = os.path.join(config.data_dir, "sandboxes", other["id"])
                gw_port = int(mt.gateway.rsplit(":", 1)[1])
                api_port = int(mt.url.rsplit(":", 1)[1])
                fake_port = int(fake.url.rsplit(":", 1)[1])
                cfg_holder["cfg"] = {
                    "secrets": enc([TEST_KEY, mt.node_secret, GH_TOKEN, SETTING, opt_secret]),
                    "host_paths": [
                        config.data_dir,
                        other_ws,
                        opt_dir,
                        os.path.join(other_ws, "run", "agent.sock"),
                        str(REPO_ROOT / "README.md"),
                        tmp,
                    ],  # fmt: skip
                    "ports": [gw_port, api_port, fake_port, 22],
                    "host_ips": host_ips(),
                    "runtime_paths": runtime_paths_for_probe(),
                }
                task = await mt.submit("probe", repo=repo)
                final = await mt.finish(task["id"], timeout=180)
                assert final["state"] == "succeeded", final
                result = probe_result(fake)
                assert_all_denied(result)
                # one uid per slot: the probe ran in the second slot while the other task held the first
                assert result["uid"]["detail"].startswith(f"uid {config.sandbox_uid + 1} "), result["uid"]
                await mt.client.post(f"/v1/tasks/{other['id']}/cancel")
                await mt.finish(other["id"], timeout=60)
    finally:
        shutil.rmtree(opt_dir, ignore_errors=True)


def _world_traversable(path: str) -> bool:
    p = os.path.abspath(path)
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            return False
        p = os.path.dirname(p)
    return True


def _executable_for(uid: int, tmp: str) -> tuple[str, str]:
    """The one-folder build and Claude Code where another uid can run them (copied out of a
    checkout it cannot enter, e.g. under /root)."""
    build = REPO_ROOT / "dist" / "marathon-dir" / "marathon-agent"
    if not build.exists():
        raise RuntimeError(f"{build} is missing: run `make build` (make test does)")
    exe, claude = str(build), claude_bin()
    if not _world_traversable(os.path.dirname(exe)):
        shutil.copytree(build.parent, os.path.join(tmp, "marathon-dir"), symlinks=True)
        exe = os.path.join(tmp, "marathon-dir", "marathon-agent")
    if not _world_traversable(os.path.dirname(os.path.realpath(claude))):
        dst = os.path.join(tmp, "claude")
        try:
            os.link(os.path.realpath(claude), dst)
        except OSError:
            shutil.copy2(os.path.realpath(claude), dst)
        claude = dst
    return exe, claude


@asynccontextmanager
async def nonroot_node(mt, fake, tmp: str, **settings):
    """``marathon serve --role node`` as uid NONROOT_UID, in its own process; yields its log path."""
    exe, claude = _executable_for(NONROOT_UID, tmp)
    node_data = os.path.join(tmp, "node-data")
    os.makedirs(node_data, exist_ok=True)
    os.chown(node_data, NONROOT_UID, NONROOT_UID)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": node_data, "LANG": "C.UTF-8",
        "MARATHON_ORCHESTRATOR": mt.gateway, "MARATHON_NODE_SECRET": mt.node_secret,
        "MARATHON_DATA_DIR": node_data, "MARATHON_CLAUDE_BIN": claude,
        "MARATHON_ANTHROPIC_API_KEY": TEST_KEY, "MARATHON_ANTHROPIC_BASE_URL": fake.url,
        "MARATHON_LOG_LEVEL": "debug", "GITHUB_TOKEN": GH_TOKEN, "MARATHON_PROBE_SETTING": SETTING,
        **{f"MARATHON_{k.upper()}": v for k, v in settings.items()},
    }  # fmt: skip
    log_path = os.path.join(tmp, "node.log")
    with open(log_path, "wb") as logf:
        node = await trio.lowlevel.open_process(
            ["setpriv", f"--reuid={NONROOT_UID}", f"--regid={NONROOT_UID}", "--clear-groups", "--",
             exe, "serve", "--role", "node"],
            env=env, stdout=logf, stderr=logf, cwd=node_data,
        )  # fmt: skip
    try:
        await until(lambda: bool(mt.info.nodes.connected()), timeout=60)
        yield log_path, node_data, exe
    finally:
        node.send_signal(signal.SIGINT)
        with trio.move_on_after(20):
            await node.wait()
        if node.returncode is None:
            node.kill()
            await node.wait()


def readable_repo(tmp: str) -> str:
    repo = make_git_repo(os.path.join(tmp, "repo"))
    os.chmod(tmp, 0o755)
    for dirpath, dirnames, filenames in os.walk(repo):
        for n in dirnames + filenames:
            os.chmod(os.path.join(dirpath, n), 0o755 if os.path.isdir(os.path.join(dirpath, n)) else 0o644)
    return repo


async def test_nonroot_node_in_its_own_process_denies_every_probe():
    tmp = scratch_dir()
    repo = readable_repo(tmp)
    opt_dir, opt_secret = plant_opt_secret()
    cfg_holder: dict = {}

    def script(body, i):
        return [probe_turn(cfg_holder["cfg"]), fa.text("probed")][i]

    try:
        async with fa.open_fake_anthropic(script) as fake:
            config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
            async with run_marathon(config, role="orchestrator") as mt:
                await mt.client.put("/v1/auth/github-token", json={"token": GH_TOKEN})
                async with nonroot_node(mt, fake, tmp, bwrap="required") as (log_path, node_data, exe):
                    gw_port = int(mt.gateway.rsplit(":", 1)[1])
                    api_port = int(mt.url.rsplit(":", 1)[1])
                    fake_port = int(fake.url.rsplit(":", 1)[1])
                    cfg_holder["cfg"] = {
                        "secrets": enc([TEST_KEY, mt.node_secret, GH_TOKEN, SETTING, opt_secret]),
                        "host_paths": [node_data, config.data_dir, opt_dir, str(REPO_ROOT / "README.md"), tmp],
                        "ports": [gw_port, api_port, fake_port, 22],
                        "host_ips": host_ips(),
                        "runtime_paths": [os.path.dirname(exe)],
                    }
                    task = await mt.submit("probe", repo=repo)
                    final = await mt.finish(task["id"], timeout=240)
                    with open(log_path) as f:
                        assert final["state"] == "succeeded", (final["message"], f.read()[-3000:])
                    assert_all_denied(probe_result(fake))
    finally:
        shutil.rmtree(opt_dir, ignore_errors=True)


async def test_nonroot_node_without_bubblewrap_runs_a_task():
    """The plain fallback on a node that is not root: no isolation (it says so), but it works."""
    tmp = scratch_dir()
    repo = readable_repo(tmp)
    script = [fa.tool_use("Write", {"file_path": "out.txt", "content": "plain and unprivileged\n"}), fa.text("ok")]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with (
            run_marathon(config, role="orchestrator") as mt,
            nonroot_node(mt, fake, tmp, bwrap="off") as (log, _, _),
        ):
            final = await mt.finish((await mt.submit("plain", repo=repo))["id"], timeout=240)
            with open(log) as f:
                log_text = f.read()
            assert final["state"] == "succeeded", (final["message"], log_text[-3000:])
            assert "NO isolation" in log_text
            assert "+plain and unprivileged" in (await mt.client.get(f"/v1/tasks/{final['id']}/diff")).text


def test_the_probe_sees_leaks_where_there_is_no_sandbox(tmp_path):
    """The probes can fail: run on the host, with a secret in its own environment, they report it."""
    secret = "host-secret-" + secrets.token_hex(8)
    (tmp_path / "app.env").write_text(f"KEY={secret}\n")
    cfg = {"secrets": enc([secret]), "host_paths": [str(tmp_path)], "ports": [], "host_ips": [], "runtime_paths": [],
           "walk": [str(tmp_path)]}  # fmt: skip
    res = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(cfg), capture_output=True, text=True,
                         env={**os.environ, "MARATHON_LEAK": secret}, timeout=300)  # fmt: skip
    result = json.loads(res.stdout.split("PROBE-RESULT ", 1)[1])
    leaked = {k for k, v in result.items() if not v["denied"]}
    assert {
        "proc_environ_cmdline",
        "no_secret_in_files",
        "host_paths_hidden",
        "etc_is_the_sandboxes",
        "passwd_is_the_sandboxes",
        "no_host_var",
        "uid",
    } <= leaked, leaked
