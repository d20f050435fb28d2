"""docker/systemd: the units for the worker and the coordinator say what docs/operations.md promises (the
venv's entry points, the environment file, a clean stop on SIGTERM with time to return a task or write a
checkpoint, restart on failure but not on a refused configuration, a dedicated user, hardening that leaves
the GPUs to the worker), their MQFED_ variables and those of the example environment files are real
config keys, and `systemd-analyze verify` accepts both units where systemd is installed."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from coordinator.experiment import ExperimentConfig
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "docker" / "systemd"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section -> key -> every value given (systemd allows a key more than once, e.g.
    Environment=), comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{n}: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def environment(unit: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for line in unit["Service"].get("Environment", []) for item in line.split())


def env_file(path: Path, commented: bool) -> dict[str, str]:
    """VAR=value lines of an example environment file (also the commented-out `#VAR=value` ones)."""
    out = {}
    for line in path.read_text().splitlines():
        found = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if found and (commented or not found[1]):
            out[found[2]] = found[3]
    return out


CASES = {
    "worker": ("mqfed-worker.service", "mqfed-worker run", "/etc/mqfed/worker.env", 60),
    "coordinator": ("mqfed-coordinator.service", "mqfed-coordinator run --config", "/etc/mqfed/coordinator.env", 120),
}


@pytest.mark.parametrize("role", CASES)
def test_a_unit_runs_the_venv_entry_point_stops_cleanly_and_restarts_on_failure(role):
    name, command, env_path, min_stop_s = CASES[role]
    unit = parse_unit(UNITS / name)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "Type") == "simple"
    exec_start = one(unit, "Service", "ExecStart")
    assert exec_start.startswith(f"/opt/mqfed/.venv/bin/{command}"), exec_start
    assert "--config /etc/mqfed/" in exec_start
    assert one(unit, "Service", "EnvironmentFile") == env_path  # no "-": a missing file (no AMQP_URL) fails the start
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "KillMode") == "mixed"  # the daemon forwards SIGTERM to its trainers itself
    assert int(one(unit, "Service", "TimeoutStopSec")) >= min_stop_s
    assert one(unit, "Service", "Restart") == "on-failure"
    assert int(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "RestartPreventExitStatus") == "2"  # the CLIs' exit status for a refused config
    assert one(unit, "Service", "User") == "mqfed" and one(unit, "Service", "Group") == "mqfed"
    assert one(unit, "Service", "WorkingDirectory") == "/var/lib/mqfed"
    assert one(unit, "Service", "StateDirectory") == "mqfed"
    assert one(unit, "Service", "UMask") == "0077"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "MemoryDenyWriteExecute" not in unit["Service"]  # torch and CUDA compile kernels at run time
    env = environment(unit)
    assert env["MQFED_LOG_JSON"] == "1"
    mqfed = {k: v for k, v in env.items() if k.startswith("MQFED_") and k not in ("MQFED_LOG_JSON",)}
    load_config(WorkerConfig if role == "worker" else ExperimentConfig, env=mqfed)  # real keys, valid values


def test_the_worker_unit_leaves_the_gpus_reachable():
    service = parse_unit(UNITS / "mqfed-worker.service")["Service"]
    assert "PrivateDevices" not in service and "DevicePolicy" not in service and "DeviceAllow" not in service
    assert parse_unit(UNITS / "mqfed-coordinator.service")["Service"]["PrivateDevices"] == ["yes"]


@pytest.mark.parametrize("role, cls", [("worker", WorkerConfig), ("coordinator", ExperimentConfig)])
def test_the_example_environment_files_set_amqp_url_are_0600_and_name_real_keys(role, cls):
    path = UNITS / f"{role}.env.example"
    text = path.read_text()
    assert "0600" in text and "AMQP_URL" in env_file(path, commented=False)
    mqfed = {k: v for k, v in env_file(path, commented=True).items()
             if k.startswith("MQFED_") and k != "MQFED_LOG_LEVEL"}
    assert any("METRICS_PORT" in k for k in mqfed)
    load_config(cls, env=mqfed)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_both_units(tmp_path):
    """`systemd-analyze verify` on copies whose ExecStart points at this venv's entry points (it checks that
    the command exists)."""
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "mqfed-worker").exists():
        pytest.skip(f"no mqfed entry points in {venv_bin} (pip install -e .)")
    for name in ("mqfed-worker.service", "mqfed-coordinator.service"):
        (tmp_path / name).write_text((UNITS / name).read_text().replace("/opt/mqfed/.venv/bin", str(venv_bin)))
    done = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, tmp_path.iterdir()))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
