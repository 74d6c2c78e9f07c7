"""The listening TCP sockets of a process tree: what a run or a server exposes (README, issue 16)."""

from __future__ import annotations

import ipaddress

import psutil


def listening(root_pid: int) -> set[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket held by `root_pid` or any of
    its descendants (Ray's GCS, raylet, agents and workers are the run's; vLLM's engine core and
    worker are the server's). Processes that end while being read are skipped."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((process.pid, name, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (a dual-stack socket bound to
    127.0.0.1 shows as ::ffff:127.0.0.1); the wildcards 0.0.0.0 and :: are not."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
