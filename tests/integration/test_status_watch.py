"""`mqfed-coordinator status --watch` on a real federation (coordinator, evaluator and two worker processes,
kws-tiny on the tiny corpus), run as a user runs it (`python -m coordinator.cli status ...`): as a log (stdout
to a file: timestamped lines, no escape codes) and in a real terminal (tmux, 80x30: the view fits, shows the
trainers, a version and the queues); both leave with exit status 0 (SIGTERM, Ctrl-C)."""
from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from coordinator.local_federation import ROOT, LocalFederation, child_env

from . import federation

pytestmark = pytest.mark.integration

TIMEOUT_S = 300.0  # two cores shared with other jobs: each process imports torch, the first versions take a while
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


@pytest.fixture(scope="module")
def running(broker_url, tiny_corpus_dir, tmp_path_factory):
    """A federation that keeps training while the tests watch it (stopped and deleted afterwards)."""
    name = f"it-status-{uuid.uuid4().hex[:8]}"
    cfg = federation.experiment_config(name, tmp_path_factory.mktemp("status") / "run", tiny_corpus_dir, **{
        "local.steps": 2, "local.batch_size": 8, "stop.max_versions": 0, "stop.max_wall_s": 900.0})
    fed = LocalFederation(cfg, tiny_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                          env={"MQFED_WORKER_HEARTBEAT_S": "1"})
    fed.start()
    try:
        yield fed
    finally:
        fed.stop()
        fed.delete_queues()


def _watch_argv(name: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", "status", "--experiment", name, "--watch", "--interval", "1"]


def _wait(fed: LocalFederation, condition, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"status --watch exited with {proc.returncode} while waiting for {what}")
        for p in [fed.coordinator, fed.evaluator, *fed.workers.values()]:
            if p is not None and p.poll() is not None:
                raise AssertionError(f"waiting for {what}: {' '.join(p.args[2:5])} exited with {p.returncode}"
                                     f" (logs in {fed.run_dir})")
        time.sleep(1.0)
    raise AssertionError(f"timed out after {TIMEOUT_S:.0f} s waiting for {what} (logs in {fed.run_dir})")


def _log_trainers_done(text: str) -> bool:
    """In one block: a version, an evaluation and the queue counts (the management API has its statistics) are
    known, and both trainers have published an update (the new heartbeat fields made it through)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(r" version=\d+ accuracy=\d\.\d{4}@v\d+ tasks=\d+/\d+/\d+ updates=\d+/\d+/1 dead_letters=0 ", line):
            block = lines[i + 1:i + 3]
            if len(block) == 2 and all(re.search(r" base=\d+ update_age=\S+ stale=\d+ samples_per_s=[\d.]+ ", b)
                                       for b in block):
                return True
    return False


def test_status_watch_as_a_log(running, tmp_path):
    out, err = tmp_path / "watch.log", tmp_path / "watch.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(_watch_argv(running.name), stdout=stdout, stderr=stderr, env=child_env(), cwd=ROOT)
    try:
        _wait(running, lambda: _log_trainers_done(out.read_text()), "both trainers' updates in the log", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    data = out.read_bytes()
    text = data.decode()
    print(text[-3000:])
    assert rc == 0, err.read_text()[-2000:]
    assert b"\x1b" not in data
    lines = text.splitlines()
    assert lines and all(_STAMP.match(line) for line in lines), [line for line in lines if not _STAMP.match(line)][:3]
    for i, line in enumerate(lines):  # a summary per interval; without queues only while the experiment is not there
        if f" experiment={running.name} " in line and " tasks=" not in line:
            assert " note: waiting: the experiment is not declared" in lines[i + 1], lines[i:i + 2]
        elif f" experiment={running.name} " in line:
            assert re.search(r" tasks=\S+/\S+/\S+ updates=\S+/\S+/\S+ dead_letters=\S+ trainers=\d+$", line), line
    assert {re.search(r"trainer=(\S+)", line).group(1) for line in lines if " trainer=" in line} == {"w1/cpu", "w2/cpu"}


def _capture(tmux: list[str]) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", "-J", "-t", "watch"], capture_output=True, text=True,
                          check=True).stdout


_ROW = re.compile(r"^(w[12]/cpu)\s+(\S+)\s+(\S+)\s+(v\d+ \S+|-)\s+(\d+|-)\s+([\d.]+|-)\s+(\S+)$")


def _screen_done(screen: str) -> bool:
    rows = [m for m in map(_ROW.match, screen.splitlines()) if m]
    return (re.search(r"^model version \d+ ", screen, re.M) is not None and len(rows) == 2
            and all(m.group(4) != "-" and m.group(6) != "-" for m in rows))


def test_status_watch_in_a_real_terminal(running, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (Debian: apt-get install tmux): the terminal view is not checked here")
    rc_file, err = tmp_path / "rc", tmp_path / "watch.err"
    script = tmp_path / "watch.sh"
    env = child_env()
    exports = "".join(f"export {k}={shlex.quote(env[k])}\n" for k in ("PYTHONPATH", "AMQP_URL", "MQFED_LOG_JSON",
                                                                      "HF_HUB_OFFLINE") if k in env)
    # `trap : INT`: the shell outlives the Ctrl-C that reaches its whole foreground group, to write the exit
    # status; python restores the default handler on exec, so Ctrl-C still reaches it as SIGINT.
    script.write_text(f"{exports}cd {shlex.quote(str(ROOT))}\ntrap : INT\n"
                      f"{shlex.join(_watch_argv(running.name))} 2>{shlex.quote(str(err))}\n"
                      f"echo $? > {shlex.quote(str(rc_file))}\nsleep 600\n")
    tmux = ["tmux", "-L", f"mqfed-test-{uuid.uuid4().hex[:8]}"]  # a server of its own: no user's session touched
    subprocess.run([*tmux, "-f", "/dev/null", "new-session", "-d", "-s", "watch", "-x", "80", "-y", "30",
                    f"sh {shlex.quote(str(script))}"], check=True, env={**env, "TERM": "xterm"})
    try:
        screen = ""

        def ready() -> bool:
            nonlocal screen
            screen = _capture(tmux)
            return _screen_done(screen)

        try:
            _wait(running, ready, "both trainers' updates on the screen")
        finally:
            print(screen)
        lines = screen.splitlines()
        assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
        assert lines[0].startswith(f"mqfed status  experiment {running.name}") and lines[0].endswith(" UTC")
        for queue in ("tasks", "updates", "dead-letters"):
            assert any(re.match(rf"^{queue}\s+\d+\s+\d+\s+\d+$", line) for line in lines), queue
        assert f"queues mqfed.{running.name}.* (management API)" in lines
        assert any(line.startswith("trainer ") and line.rstrip().endswith("beat") for line in lines)
        assert sorted(m.group(1) for m in map(_ROW.match, lines) if m) == ["w1/cpu", "w2/cpu"]
        subprocess.run([*tmux, "send-keys", "-t", "watch", "C-c"], check=True)  # Ctrl-C, as a user leaves it
        deadline = time.monotonic() + 30
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rc_file.exists() and rc_file.read_text().strip() == "0", err.read_text()[-2000:]
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_status_without_watch_prints_one_snapshot(running):
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "status", "--experiment", running.name,
                           "--seconds", "3"], capture_output=True, env=child_env(), cwd=ROOT, timeout=120)
    text = done.stdout.decode()
    print(text)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"\x1b" not in done.stdout and max(len(line) for line in text.splitlines()) <= 80
    assert text.startswith(f"mqfed status  experiment {running.name}")
    assert re.search(r"^model version \d+ ", text, re.M)
    assert sorted(m.group(1) for m in map(_ROW.match, text.splitlines()) if m) == ["w1/cpu", "w2/cpu"]
