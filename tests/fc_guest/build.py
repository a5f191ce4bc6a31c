"""Build the tiny Firecracker test guest (``guest.S``) into an ELF ``vmlinux`` with binutils.

python3 tests/fc_guest/build.py OUT_DIR      # prints the path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "guest.S")
BANNER = "MARATHON-FC-GUEST up"


def build_guest(out_dir: str, *, period_ns: int = 50_000_000) -> str:
    """Assemble and link ``guest.S`` at 1 MiB (one RWX segment, entry = _start), ticking every
    ``period_ns`` (APIC timer count at KVM's 1 GHz bus).  Returns the ELF's path; raises
    RuntimeError with what to install when binutils is missing."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: install binutils (apt-get install binutils)")
    os.makedirs(out_dir, exist_ok=True)
    obj, elf = os.path.join(out_dir, "guest.o"), os.path.join(out_dir, "guest.elf")
    subprocess.run(["as", "--64", f"--defsym=PERIOD={period_ns}", "-o", obj, SOURCE], check=True, capture_output=True)
    quiet = (
        ["--no-warn-rwx-segments"]
        if "--no-warn-rwx-segments" in subprocess.run(["ld", "--help"], capture_output=True, text=True).stdout
        else []
    )  # binutils >= 2.39
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "-N",
            *quiet,
            "-Ttext=0x100000",
            "-e",
            "_start",
            "-o",
            elf,
            obj,
        ],
        check=True,
        capture_output=True,
    )
    return elf


if __name__ == "__main__":
    print(build_guest(sys.argv[1] if len(sys.argv) > 1 else "."))
