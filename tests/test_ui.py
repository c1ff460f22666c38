"""`vaelab ui` as a user meets it: it answers on loopback, a taken port is one line and exit 2, and
stopping vaelab (SIGTERM, as `kill` sends, or Ctrl-C) stops the whole MLflow server with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_ui(cwd: Path, port: int, *extra: str) -> subprocess.Popen:
    """`vaelab ui` in `cwd`, on its runs/mlflow.db (made here, empty, where it is not there yet: `vaelab ui`
    only reads a store, and refuses where there is none)."""
    from vaelab.tracking import MlflowRuns

    if "--tracking-uri" not in extra and not (cwd / "runs" / "mlflow.db").is_file():
        (cwd / "runs").mkdir(exist_ok=True)
        MlflowRuns(f"sqlite:///{cwd / 'runs' / 'mlflow.db'}").create()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    # Not a session of its own: signals go to vaelab alone, as `kill <pid>` would send them.
    return subprocess.Popen([sys.executable, "-m", "vaelab", "ui", "--port", str(port), *extra], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_up(server: subprocess.Popen, port: int, timeout: float = 120,
                  path: str = "/health") -> tuple[float, list[str]]:
    """Seconds until vaelab says the UI is ready (and it answers), and vaelab's output lines, still filling."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(server.stdout.readline, "")), daemon=True).start()
    started = time.monotonic()
    while not (any("ready on" in line for line in lines) and answers(port, path)):
        if server.poll() is not None:
            pytest.fail(f"MLflow UI exited: {''.join(lines)}")
        if time.monotonic() - started > timeout:
            pytest.fail("MLflow UI did not come up")
        time.sleep(0.3)
    return time.monotonic() - started, lines


def group_members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[1] == str(pgid)]


def server_group(vaelab_pid: int) -> int:
    """The process group of the server vaelab started (its child's, a group of its own)."""
    for _ in range(50):
        out = subprocess.run(["ps", "-o", "pid=,pgid=", "--ppid", str(vaelab_pid)], capture_output=True, text=True)
        rows = [line.split() for line in out.stdout.splitlines()]
        if rows:
            return int(rows[0][1])
        time.sleep(0.1)
    pytest.fail("vaelab ui started no server process")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_ui_answers_on_loopback_and_stops_whole(tmp_path: Path, stop: signal.Signals):
    port = free_port()
    server = start_ui(tmp_path, port)
    try:
        seconds, lines = wait_until_up(server, port)
        group = server_group(server.pid)
        assert len(group_members(group)) >= 1
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if listening.returncode == 0 and listening.stdout.strip():
            assert {line.split()[3].rsplit(":", 1)[0] for line in listening.stdout.splitlines()} == {"127.0.0.1"}
        server.send_signal(stop)
        assert server.wait(timeout=60) == 0
        output = "".join(lines)
        assert "ready on http://127.0.0.1:" in output and "workflowType=machine_learning" in output
        deadline = time.monotonic() + 15
        while (answers(port) or group_members(group)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not answers(port), "the MLflow server still answers after vaelab ui stopped"
        assert group_members(group) == [], "server processes outlived vaelab ui"
        print(f"MLflow UI answered after {seconds:.1f} s")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "vaelab", "ui", "--port", str(port)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip() == (f"vaelab: error: --port {port}: 127.0.0.1:{port} is already in use; stop what "
                                   "holds it or pass another --port")
    assert not (tmp_path / "runs").exists()  # refused before the store was touched
