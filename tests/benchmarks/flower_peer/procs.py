"""Start, stop and account for every process an arm starts, grandchildren included (Linux only).

`Supervisor` runs in a process of its own (the runner's inner process) that is a child subreaper: a
descendant whose parent dies is re-parented to it, not to init, so every process of the arm stays its
descendant, is found by walking the process tree, is reaped by it, and its CPU time ends up in its
`RUSAGE_CHILDREN` (each process's waited-for children included). `survivors(marker)` finds, from anywhere,
any process still carrying the arm's environment marker.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
MARKER = "FLOWER_PEER_RUN"  # environment variable every process of a run inherits: its run id


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int) -> list[int]:
    """Every live (or zombie) descendant of `root`, parents before children."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def survivors(run_id: str) -> list[int]:
    """Pids of live processes (not zombies) whose environment carries MARKER=run_id."""
    needle = f"{MARKER}={run_id}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


class Supervisor:
    """The processes of one arm, started from and reaped by this process (made a child subreaper).

    start() launches a command in its own session (process group), output to `logs/<name>.log`; reap()
    collects exited descendants without blocking (call it often: Flower's children watch their parent's pid,
    which a zombie keeps alive); stop() ends every descendant (SIGTERM, then SIGKILL after `grace` s) and
    reaps them all; cpu_s() is the CPU seconds (user + sys) of every process reaped since construction.
    """

    def __init__(self, log_dir: str | os.PathLike, env: dict[str, str]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.procs: dict[str, int] = {}  # name -> pid of what start() launched
        self.exited: dict[int, int] = {}  # pid -> wait status of every reaped descendant
        self._popen: list[subprocess.Popen] = []
        self._cpu0 = self._children_cpu()

    @staticmethod
    def _children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> int:
        """Launch `argv` as `name` (its own process group; stdout and stderr to logs/<name>.log); its pid."""
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc.pid
        self._popen.append(proc)  # kept: a collected Popen of a running child would reap it behind reap()'s back
        return proc.pid

    def returncode(self, name: str) -> int | None:
        """Exit code of the process started as `name` (-signal when killed), None while it runs."""
        status = self.exited.get(self.procs[name])
        return None if status is None else os.waitstatus_to_exitcode(status)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = status

    def stop(self, grace: float = 3.0) -> list[str]:
        """End every descendant: SIGTERM, SIGKILL those left after `grace` s, reap all. Returns the commands
        of those that needed SIGKILL. Raises RuntimeError when some outlive 30 s of SIGKILLs."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.reap()
            if not self._live():
                break
            time.sleep(0.05)
        killed = [cmd for cmd in map(command, self._live()) if cmd]  # zombies have no command line
        deadline = time.monotonic() + 30.0
        while self._live():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes outlive SIGKILL: {[command(p) for p in self._live()]}")
            self._signal_all(signal.SIGKILL)
            time.sleep(0.05)
            self.reap()
        return killed

    def _live(self) -> list[int]:
        return [pid for pid in descendants(os.getpid()) if pid not in self.exited]

    def _signal_all(self, sig: int) -> None:
        for pid in self._live():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def cpu_s(self) -> float:
        return self._children_cpu() - self._cpu0
