"""The local web servers vaelab starts for a user (the MLflow UI, optuna-dashboard): bound to loopback
unless told otherwise, a port already taken is one error line, and stopping vaelab (Ctrl-C or SIGTERM)
stops the whole server: it runs in a process group of its own, which is ended as one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from vaelab.errors import UsageError

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """UsageError if nothing can listen on host:port (another server has it, or the address is not ours);
    `flag` is the option that chose the port."""
    if not 1 <= port <= 65535:
        raise UsageError(f"{flag}: expected 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the servers themselves bind: a port whose old connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            why = "already in use" if err.errno == 98 else (err.strerror or str(err))
            raise UsageError(f"{flag} {port}: {host}:{port} is {why}; stop what holds it or pass another {flag}") \
                from None


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """End the server's whole process group: `first` (SIGTERM), then SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, first)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:  # workers the server forked may outlive it: the group goes as one
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def serve(command: Sequence[str], host: str, port: int, what: str, env: dict[str, str] | None = None,
          url_path: str = "") -> int:
    """Run a server until it exits or vaelab is stopped; says where it is once it answers."""
    check_port_free(host, port)
    proc = subprocess.Popen(list(command), env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://{host}:{port}{url_path}"
    print(f"{what}: starting on {url} (Ctrl-C stops it)", flush=True)
    started = time.monotonic()
    try:
        while not _answers(host, port):
            if proc.poll() is not None:
                print(f"vaelab: error: {what} exited with code {proc.returncode} before it answered",
                      file=sys.stderr)
                return 1
            if time.monotonic() - started > READY_TIMEOUT_S:
                print(f"vaelab: error: {what} did not answer on {url} within {READY_TIMEOUT_S:.0f} s",
                      file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"{what}: ready on {url} after {time.monotonic() - started:.1f} s", flush=True)
        code = proc.wait()
        return code
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (vaelab.cli turns it into KeyboardInterrupt)
        print(f"\n{what}: stopped", file=sys.stderr)
        return 0
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            stop_group(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
