"""Packaging: `make install` / `make uninstall` into a DESTDIR, the systemd units checked by
`systemd-analyze verify` offline (--root), and the node's capability bounding set proven
sufficient by running a real task under it (setpriv)."""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests import fake_anthropic as fa
from tests.harness import REPO_ROOT, TEST_KEY, claude_bin, make_git_repo, scratch_dir

UNITS = ("marathon-orchestrator.service", "marathon-node.service", "marathon.target")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)


def stub_executable(tmp: Path) -> Path:
    exe = tmp / "marathon-stub"
    exe.write_text("#!/bin/sh\necho marathon stub\n")
    exe.chmod(0o755)
    return exe


def install(dest: Path, exe: Path, prefix: str = "/usr/local") -> subprocess.CompletedProcess:
    res = make("install", f"DESTDIR={dest}", f"PREFIX={prefix}", f"EXECUTABLE={exe}")
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_lays_out_the_files_and_uninstall_removes_them(tmp_path):
    exe = stub_executable(tmp_path)
    dest = tmp_path / "root"
    install(dest, exe)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [
        "etc/marathon/node.env",
        "etc/marathon/node.env.example",
        "etc/marathon/orchestrator.env",
        "etc/marathon/orchestrator.env.example",
        "usr/local/bin/marathon",
        "usr/local/lib/systemd/system/marathon-node.service",
        "usr/local/lib/systemd/system/marathon-orchestrator.service",
        "usr/local/lib/systemd/system/marathon.target",
    ]
    assert (dest / "usr/local/bin/marathon").read_bytes() == exe.read_bytes()
    assert mode(dest / "usr/local/bin/marathon") == 0o755
    for u in UNITS:
        text = (dest / "usr/local/lib/systemd/system" / u).read_text()
        assert "@" not in text.replace("@system-service", ""), f"{u}: a placeholder was not filled in"
        assert mode(dest / "usr/local/lib/systemd/system" / u) == 0o644
    # the settings hold secrets: root-only; the examples are for reading
    assert mode(dest / "etc/marathon/node.env") == 0o600
    assert mode(dest / "etc/marathon/node.env.example") == 0o644
    assert "MARATHON_NODE_SECRET" in (dest / "etc/marathon/node.env").read_text()

    # a second install keeps the operator's settings
    env = dest / "etc/marathon/node.env"
    env.write_text(env.read_text() + "MARATHON_SLOTS=8\n")
    install(dest, exe)
    assert env.read_text().endswith("MARATHON_SLOTS=8\n")

    res = make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr/local")
    assert res.returncode == 0, res.stderr
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert left == ["etc/marathon/node.env"], left  # edited: kept, and said so
    assert "kept" in res.stdout and "node.env" in res.stdout
    env.unlink()
    assert make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr/local").returncode == 0
    assert not (dest / "etc/marathon").exists()


def test_prefix_decides_where_things_go(tmp_path):
    dest = tmp_path / "root"
    install(dest, stub_executable(tmp_path), prefix="/usr")
    assert (dest / "usr/bin/marathon").is_file()
    unit = dest / "usr/lib/systemd/system/marathon-node.service"
    s = unit_settings(unit)
    assert s["Service.ExecStart"] == ["/usr/bin/marathon serve --role node"]
    assert s["Service.EnvironmentFile"] == ["/etc/marathon/node.env"]


def test_units_say_what_the_issue_asks():
    orch = unit_settings(REPO_ROOT / "packaging/systemd/marathon-orchestrator.service")
    node = unit_settings(REPO_ROOT / "packaging/systemd/marathon-node.service")
    for role, s in (("orchestrator", orch), ("node", node)):
        assert s["Service.Type"] == ["notify"] and s["Service.NotifyAccess"] == ["all"]
        assert s["Service.ExecStart"] == [f"@BINDIR@/marathon serve --role {role}"]
        assert s["Service.EnvironmentFile"] == [f"@SYSCONFDIR@/marathon/{role}.env"]
        assert s["Service.Restart"] == ["on-failure"] and s["Service.KillMode"] == ["mixed"]
        assert int(s["Service.LimitNOFILE"][0]) >= 65536
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert s[f"Service.{key}"] == ["yes"], (role, key)
        assert s["Service.ProtectSystem"] == ["strict"]
        assert s["Install.WantedBy"] == ["marathon.target"] and s["Unit.PartOf"] == ["marathon.target"]
        assert "Service.WatchdogSec" in s
    # the orchestrator writes its state directory only
    assert "Service.ReadWritePaths" not in orch and orch["Service.StateDirectory"] == ["marathon-orchestrator"]
    assert orch["Service.CapabilityBoundingSet"] == [""] and orch["Service.DynamicUser"] == ["yes"]
    # the node: stop after drain_timeout (60 s by default) and the bounded sandbox cleanup (30 s)
    assert int(node["Service.TimeoutStopSec"][0].rstrip("s")) > 60 + 30
    assert node["Service.Delegate"] == ["yes"] and node["Service.DevicePolicy"] == ["closed"]
    devices = {v.split()[0] for v in node["Service.DeviceAllow"]}
    assert {"/dev/kvm", "/dev/net/tun", "/dev/loop-control", "block-loop"} <= devices
    assert sorted(node["Service.ReadWritePaths"]) == ["-/srv/jailer", "/run/netns"]
    assert node["Service.OOMPolicy"] == ["continue"]


@pytest.fixture
def verify_root(tmp_path):
    """A DESTDIR install that systemd-analyze can verify offline: the units, the executable
    they start, and the system's own units they depend on (sysinit.target, …)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not found: install the Debian package systemd (make test does)")
    dest = tmp_path / "root"
    install(dest, stub_executable(tmp_path))
    shutil.copytree("/usr/lib/systemd/system", dest / "usr/lib/systemd/system", symlinks=True)
    (dest / "usr/bin").mkdir()
    shutil.copy2("/bin/mkdir", dest / "usr/bin/mkdir")  # ExecStartPre=+/bin/mkdir -p /run/netns
    (dest / "bin").symlink_to("usr/bin")
    return dest


def verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *(f"/usr/local/lib/systemd/system/{u}" for u in units)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def test_systemd_analyze_verify_finds_nothing_to_say(verify_root):
    res = verify(verify_root, *UNITS)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def test_systemd_analyze_verify_would_notice_a_mistake(verify_root):
    unit = verify_root / "usr/local/lib/systemd/system/marathon-node.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nProtectSystm=strict"))
    res = verify(verify_root, "marathon-node.service")
    assert "Unknown key" in res.stderr and "ProtectSystm" in res.stderr, res.stderr
    (verify_root / "usr/local/bin/marathon").unlink()
    res = verify(verify_root, "marathon-node.service")
    assert res.returncode != 0 and "marathon" in res.stderr


def bounding_set() -> str:
    caps = unit_settings(REPO_ROOT / "packaging/systemd/marathon-node.service")["Service.CapabilityBoundingSet"][0]
    return "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps.split())


@pytest.mark.slow
async def test_a_node_with_the_units_capabilities_runs_a_real_task():
    """The node's CapabilityBoundingSet and NoNewPrivileges, applied with setpriv: bubblewrap
    and the agent still work and a real task succeeds.  Without CAP_SYS_ADMIN it cannot."""
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [fa.tool_use("Write", {"file_path": "NOTE.md", "content": "hi\n"}), fa.text("Wrote NOTE.md.")]
    async with fa.open_fake_anthropic(script) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARATHON_")}
        env.update(
            PYTHONPATH=str(REPO_ROOT),
            MARATHON_DATA_DIR=os.path.join(tmp, "data"),
            MARATHON_HTTP_LISTEN="tcp:127.0.0.1:0",
            MARATHON_GATEWAY_LISTEN="tcp:127.0.0.1:0",
            MARATHON_ANTHROPIC_API_KEY=TEST_KEY,
            MARATHON_ANTHROPIC_BASE_URL=fake.url,
            MARATHON_CLAUDE_BIN=claude_bin(),
            MARATHON_BWRAP="required",
            MARATHON_LOG_FORMAT="text",
            XDG_CONFIG_HOME=os.path.join(tmp, "config"),
        )
        serve = [sys.executable, "-m", "marathon", "serve", "--role", "all"]

        # without CAP_SYS_ADMIN bubblewrap cannot make a sandbox: the node refuses to start
        weak = await trio.run_process(
            ["setpriv", "--no-new-privs", "--bounding-set", bounding_set().replace(",+sys_admin", ""), "--", *serve],
            env=env,
            capture_stderr=True,
            check=False,
            cwd=tmp,
        )
        assert weak.returncode != 0 and b"bwrap = required" in weak.stderr, weak.stderr.decode()[-2000:]

        async with trio.open_nursery() as n:
            server = await n.start(
                functools.partial(
                    trio.run_process,
                    ["setpriv", "--no-new-privs", "--bounding-set", bounding_set(), "--", *serve],
                    env=env,
                    stderr=subprocess.PIPE,
                    check=False,
                    cwd=tmp,
                )
            )
            try:
                buf = b""
                with trio.fail_after(60):
                    while b"marathon all: API on" not in buf:
                        chunk = await server.stderr.receive_some(4096)
                        assert chunk, buf.decode()
                        buf += chunk
                url = buf.split(b"API on ", 1)[1].split()[0].decode()
                n.start_soon(_drain, server.stderr)
                res = await trio.run_process(
                    [sys.executable, "-m", "marathon", "run", "write a note", "--repo", repo],
                    env={**env, "MARATHON_URL": url},
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                out = res.stdout.decode()
                assert res.returncode == 0, out + res.stderr.decode()
                assert "→ Write NOTE.md" in out and "succeeded" in out
            finally:
                server.terminate()
                with trio.move_on_after(10):
                    await server.wait()
                server.kill()


async def _drain(stream):
    while await stream.receive_some(65536):
        pass
