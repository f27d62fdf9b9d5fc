"""Storage faults produced for real: a full filesystem, an immutable file (root only).

Used by the audit writer's tests and by the gateway's fail-closed tests; each skips, with
the reason, where the machine cannot produce the fault.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def size_capped_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), unmounted afterwards whatever happened."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-capped tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem is full; delete it to free the space."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                if os.write(fd, chunk if len(chunk) > 1 else b"\0") == 0:
                    break
            except OSError:
                if len(chunk) == 1:
                    break
                chunk = chunk[:len(chunk) // 2]      # fill the last partial block too
    finally:
        os.close(fd)
    return ballast


@contextlib.contextmanager
def immutable(*paths: str) -> Iterator[None]:
    """chattr +i: refused even to root (a read-only mount is refused while the file is
    open). Never on -shm: SQLite maps it, and a refused page fault is SIGBUS."""
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root")
    done = subprocess.run(["chattr", "+i", *paths], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["chattr", "-i", *paths], capture_output=True)
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *paths], check=True)
