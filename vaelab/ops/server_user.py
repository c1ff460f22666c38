"""Who a server that vaelab starts runs as, and what it leaves behind: started as root, a server drops to
its own user and that user's groups (never root's group), is told to stop when vaelab dies
(`PR_SET_PDEATHSIG`), and is recorded by pid so that the next start finds and ends one that outlived it.

Used by `vaelab services`; nothing here imports torch, mlflow or optuna."""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaelab.errors import UsageError

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child calls it without importing


@dataclass(frozen=True)
class ServerUser:
    """An account a server runs as: its ids and every group it is in (root's group never among them)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def named(cls, name: str) -> ServerUser:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(sorted(set(os.getgrouplist(name, entry.pw_gid)))))

    def popen_kwargs(self) -> dict[str, Any]:
        """What subprocess needs to start a program as this user: user, group and the supplementary groups
        set together (`user=` alone keeps the caller's groups, root's among them)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def own(self, *paths: Path) -> None:
        for path in paths:
            os.chown(path, self.uid, self.gid)


def system_user(name: str, home: str = "/nonexistent") -> ServerUser:
    """The named system account, created (no login shell, no home) when missing, as Debian's server
    packages do. Only root gets here."""
    try:
        return ServerUser.named(name)
    except KeyError:
        pass
    done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", home,
                           "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"services: could not create the system user {name!r} for a server "
                         f"({(done.stderr or done.stdout).strip()[:200]}); create it, or pass another user")
    print(f"services: created the system user {name} to run a server as", flush=True)
    return ServerUser.named(name)


def _can(user: ServerUser, path: Path, want: int) -> bool:
    """Whether `user` has the permission bits `want` (an os.R_OK | W_OK | X_OK mix) on `path`, from its
    mode bits as the kernel reads them (owner, else group, else other)."""
    st = path.stat()
    if st.st_uid == user.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in user.groups or st.st_gid == user.gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def first_blocked(user: ServerUser, path: Path) -> Path | None:
    """The first folder on the way to `path` (itself included when it is a folder) that `user` cannot pass
    through, or None when it can reach it."""
    path = path.resolve()
    for folder in [*reversed(path.parents), path]:
        if folder.exists() and stat.S_ISDIR(folder.stat().st_mode) and not _can(user, folder, os.X_OK):
            return folder
    return None


def check_reachable(user: ServerUser, path: Path, what: str, flag: str) -> None:
    """One line, before anything starts, when a server's user cannot reach a folder it needs."""
    blocked = first_blocked(user, path)
    if blocked is not None:
        mode = stat.filemode(blocked.stat().st_mode)
        raise UsageError(f"{flag} {path}: the {what} runs as the user {user.name!r}, which cannot enter "
                         f"{blocked} ({mode}); pass a {flag} it can reach (e.g. under /srv or /var/lib), or "
                         f"`chmod o+x {blocked}`")


def die_with_parent(sig: int) -> Callable[[], None]:
    """A `preexec_fn` that makes the child get `sig` when the process that started it dies (even by
    kill -9). Set after the switch of user (a change of credentials clears it); a parent already gone by
    then is caught by the ppid check."""
    parent = os.getpid()

    def arm() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return arm


# ---- the record of what was started, so a next start can end what outlived a killed vaelab -------------

def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names
    one process, even after the pid is reused."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def record(path: Path, name: str, proc: subprocess.Popen) -> None:
    """Note a started server (its pid is its process group's id) in the stack's pid record."""
    known = _read(path)
    known[name] = {"pid": proc.pid, "start": _start_ticks(proc.pid),
                   "owner": os.getpid(), "owner_start": _start_ticks(os.getpid())}
    path.write_text(json.dumps(known))


def forget(path: Path, name: str) -> None:
    known = _read(path)
    if known.pop(name, None) is not None:
        path.write_text(json.dumps(known))


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def reap_leftovers(path: Path, grace_s: float = 10.0) -> list[str]:
    """End the process groups of servers an earlier, killed start left running (each still the process it
    was: same pid and start time), leaving alone those whose `vaelab services` still runs (`--only mlflow`
    beside a running `--only postgres`). Returns their names."""
    ended = []
    known = _read(path)
    for name, entry in list(known.items()):
        pid = entry.get("pid") if isinstance(entry, dict) else None
        if not isinstance(pid, int) or pid <= 1 or _start_ticks(pid) is None \
                or _start_ticks(pid) != entry.get("start"):
            known.pop(name)
            continue
        owner = entry.get("owner")
        if isinstance(owner, int) and owner > 1 and _start_ticks(owner) is not None \
                and _start_ticks(owner) == entry.get("owner_start"):
            continue  # its services command is alive: not a leftover
        known.pop(name)
        for sig in (signal.SIGINT if name == "postgres" else signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _start_ticks(pid) is not None and not _zombie(pid):
                time.sleep(0.1)
            if _start_ticks(pid) is None or _zombie(pid):
                break
        ended.append(name)
    path.write_text(json.dumps(known))
    return ended


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
