"""Hosts for the cluster tests: Linux network namespaces joined by veth links to a bridge in the
services' namespace, made and removed by the test itself (root only). The addresses (10.x.y.0/24,
picked at random per test) exist only inside these namespaces, so no test traffic leaves them; each
worker host also gets a hostname of its own (a UTS namespace), as on separate machines."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path


def can_make_namespaces() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (Linux network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 and util-linux (ip, unshare)"
    probe = f"vlprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Network:
    """A services host (`svc`) and `n_workers` worker hosts on one /24, each host its own namespace."""

    def __init__(self, n_workers: int):
        tag = f"{random.randrange(16**4):04x}"
        self.svc = f"vl{tag}s"
        self.workers = [f"vl{tag}w{k}" for k in range(n_workers)]
        self._ports = [f"vl{tag}p{k}" for k in range(n_workers)]  # the bridge side of each worker's link
        net = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.svc_ip = f"{net}.1"
        self.worker_ips = [f"{net}.{10 + k}" for k in range(n_workers)]
        self.unused_ip = f"{net}.250"  # on the subnet, but no host has it
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Network:
        try:
            _ip("netns", "add", self.svc)
            _ip("-n", self.svc, "link", "set", "lo", "up")
            _ip("-n", self.svc, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.svc, "addr", "add", f"{self.svc_ip}/24", "dev", "br0")
            _ip("-n", self.svc, "link", "set", "br0", "up")
            for host, port, address in zip(self.workers, self._ports, self.worker_ips, strict=True):
                _ip("netns", "add", host)
                _ip("-n", host, "link", "set", "lo", "up")
                _ip("link", "add", "eth0", "netns", host, "type", "veth", "peer", "name", port, "netns", self.svc)
                _ip("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", host, "link", "set", "eth0", "up")
                _ip("-n", self.svc, "link", "set", port, "master", "br0")
                _ip("-n", self.svc, "link", "set", port, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for namespace in [self.svc, *self.workers]:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # its links go with it

    def start(self, host: str, command: list[str], env: dict[str, str], cwd: Path,
              log: Path | None = None) -> subprocess.Popen:
        """`command` on `host` (a namespace name), in a process group of its own; output to `log`."""
        prefix = ["ip", "netns", "exec", host]
        if host != self.svc:  # a machine of its own: its own hostname (trial ownership names the host)
            prefix += ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh"]
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(prefix + command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    def run(self, host: str, command: list[str], env: dict[str, str], cwd: Path,
            timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["ip", "netns", "exec", host]
        return subprocess.run(prefix + command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def cut(self, k: int) -> None:
        """Worker k's link goes silent (its packets are dropped, as by a failed switch port): connections
        stall rather than fail, until `mend`."""
        _ip("-n", self.svc, "link", "set", self._ports[k], "down")

    def mend(self, k: int) -> None:
        _ip("-n", self.svc, "link", "set", self._ports[k], "up")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a started process's group and wait for it (SIGKILL after `timeout`). SIGKILL goes to every
    process group below it too (a server started in a session of its own), as when its machine fails."""
    groups = {proc.pid}
    if sig == signal.SIGKILL:
        for pid in _descendants(proc.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120, count: int = 1) -> None:
    """Until `log` holds `text` `count` times (a restarted server appends to the same log)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if log.is_file() and log.read_text(errors="replace").count(text) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before saying {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}")
