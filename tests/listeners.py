"""Which TCP ports a group of processes listens on (``ss -ltnp``): the loopback checks of the local Ray and the head.

A test skips (with the reason) where ``ss`` is missing or cannot attribute sockets to processes.
"""

import ipaddress
import os
import re
import shutil
import subprocess
import sys

import pytest


def descendants(root: int) -> set[int]:
    """``root`` and every process below it (GCS and raylet are the driver's children, workers the raylet's)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in out and pid not in out:
                out.add(pid)
                changed = True
    return out


def listeners(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process name) of the TCP sockets that ``pids`` listen on, from ``ss -ltnpH``."""
    ss = shutil.which("ss")
    if ss is None or not sys.platform.startswith("linux"):
        pytest.skip("listing listeners needs `ss` (iproute2) on Linux")
    r = subprocess.run([ss, "-Hltnp"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"`ss -ltnp` failed: {r.stderr.strip()}")
    out = []
    for line in r.stdout.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            out.append((line.split()[3], ",".join(re.findall(r'\("([^"]+)"', line))))
    return out


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    host = host.removeprefix("::ffff:")  # an IPv4-mapped IPv6 address
    if host == "*":  # every interface
        return False
    return ipaddress.ip_address(host.split("%")[0]).is_loopback
