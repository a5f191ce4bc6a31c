"""Every benchmark imports, and runs at a tiny size: a broken benchmark fails here, not when
someone wants its figures."""

from __future__ import annotations

import importlib
import os
import pkgutil

import pytest

import bench
from tests.harness import REPO_ROOT


def test_every_bench_module_imports():
    names = [m.name for m in pkgutil.iter_modules(bench.__path__)]
    assert {
        "common",
        "control_plane",
        "events",
        "executable",
        "firecracker",
        "metrics_scrape",
        "proxy",
        "repo",
        "vm",
    } <= set(names)
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        assert name == "common" or callable(getattr(module, "main", None)), f"bench.{name} has no main()"


async def test_proxy_bench(capsys):
    from bench import proxy

    await proxy.main(2)
    assert "added latency to first byte" in capsys.readouterr().out


async def test_metrics_scrape_bench(capsys):
    from bench import metrics_scrape

    await metrics_scrape.main(50, runs=3)
    out = capsys.readouterr().out
    assert "ratio metrics/healthz" in out and "GET /metrics, 50 tasks" in out


@pytest.mark.slow
async def test_control_plane_bench(capsys):
    from bench import control_plane

    await control_plane.main(2, warmup=1)
    assert "ratio marathon/baseline" in capsys.readouterr().out


@pytest.mark.slow
async def test_events_bench(capsys):
    from bench import events

    await events.main(200)
    assert "ratio live/replay" in capsys.readouterr().out


@pytest.mark.slow
async def test_repo_bench(capsys):
    from bench import repo

    await repo.main(1, 0)
    assert "ratio with/without" in capsys.readouterr().out


@pytest.mark.slow
def test_executable_bench(capsys):
    from bench import executable

    if not os.access(executable.EXE, os.X_OK):
        pytest.fail(f"{executable.EXE} is missing: build it with `make build` (make test does)")
    executable.main(1)
    assert "ratio executable/venv" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.vm
async def test_vm_bench(capsys):
    from bench import vm

    if not (REPO_ROOT / ".cache/image/current").exists():
        pytest.fail("no guest image: run `make image` (make test does)")
    await vm.main(1)
    assert "ratio cold/restore" in capsys.readouterr().out


@pytest.mark.firecracker
async def test_firecracker_bench(capsys):
    from bench import firecracker

    await firecracker.main(["--runs", "1", "--mem", "32"])
    assert "load + resume" in capsys.readouterr().out


@pytest.mark.slow
async def test_sandbox_bench(capsys):
    from bench import sandbox

    await sandbox.main(2)
    out = capsys.readouterr().out
    assert "ratio hardened/bare" in out and "memory kill -> event" in out


@pytest.mark.slow
async def test_cluster_bench(capsys):
    from bench import cluster

    await cluster.main(20, runs=1)
    out = capsys.readouterr().out
    assert "PostgreSQL, 2 replicas" in out and "per placement" in out
    assert "failover after SIGKILL" in out and "B later than A" in out
