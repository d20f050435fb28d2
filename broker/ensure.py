"""Make sure a broker answers at AMQP_URL: start a local one where possible, else explain how.

`python -m broker.ensure` / `mqfed-broker ensure`. Two halves, so the decision is testable without a broker:

- `gather(url)` looks at the machine (does AMQP_URL answer an AMQP handshake? does the management HTTP API
  answer on 15672? which of rabbitmq-server, rabbitmq-plugins, systemd, a Docker engine with compose exist?)
  and returns `Facts`;
- `decide(facts)` is pure and returns a `Plan`: the commands that would start a broker (alternatives, the
  first that succeeds wins), whether to enable the management plugin, or why nothing can be done.

`ensure()` runs the plan. Order: a broker answers -> use it. Else, only for a local URL on port 5672 with
plain amqp:// (a broker we start listens there, without TLS): `rabbitmq-plugins --offline enable
rabbitmq_management` (so the node boots with the HTTP API), then `systemctl start rabbitmq-server` (when
systemd runs and has the unit) or `rabbitmq-server -detached`; without rabbitmq-server, `docker compose -f
<repo>/docker/compose.yml up -d rabbitmq` when a Docker engine runs and the compose file exists. Once a
local broker answers, the management plugin is enabled (`rabbitmq-plugins enable rabbitmq_management`) if
15672 stays silent. A remote broker is never started or reconfigured, nor is a cluster (AMQP_URL listing
several nodes, docs/cluster.md): it answers when any of its nodes does, and is otherwise started by whoever
runs it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from common.logs import get_logger
from common.transport.connection import amqp_url, amqp_urls, url_host

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
# The compose file lives in the repository (not in an installed wheel); MQFED_COMPOSE_FILE overrides.
COMPOSE_FILE = Path(os.environ.get("MQFED_COMPOSE_FILE") or REPO_ROOT / "docker" / "compose.yml").resolve()
MANAGEMENT_PORT = 15672
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ENABLE_MANAGEMENT = ("rabbitmq-plugins", "enable", "rabbitmq_management")
HOW_TO = (
    "No RabbitMQ answers at {url}. Get one with either:\n"
    f"  docker compose -f {COMPOSE_FILE} up -d rabbitmq\n"
    "  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached   (Debian/Ubuntu)\n"
    "or point AMQP_URL at an existing broker (amqp://user:pass@host:5672/vhost, amqps:// for TLS)."
)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What `decide` needs to know about this machine."""

    url: str
    broker_answers: bool
    login_refused: str | None = None  # a broker is there but refuses AMQP_URL's user/password/vhost
    management_answers: bool = False
    hostname: str = ""  # this machine's name: counts as local in the URL
    rabbitmq_server: bool = False  # rabbitmq-server on PATH
    rabbitmq_plugins: bool = False  # rabbitmq-plugins on PATH
    systemd_unit: bool = False  # systemd is the init system and has rabbitmq-server.service
    docker_compose: bool = False  # a Docker engine answers and `docker compose` works
    compose_file: str | None = None  # absolute path of docker/compose.yml when it exists


@dataclasses.dataclass(frozen=True)
class Plan:
    prepare: tuple[tuple[str, ...], ...] = ()  # best effort, before starting
    start: tuple[tuple[str, ...], ...] = ()  # alternatives: the first that exits 0 wins
    enable_management: tuple[str, ...] | None = None  # once the broker answers, if 15672 stays silent
    problem: str | None = None  # why no broker can be had (only when it does not answer)

    @property
    def starts(self) -> bool:
        return bool(self.start)


def is_cluster(url: str) -> bool:
    """`url` lists several nodes (comma-separated)."""
    return "," in url


def is_local(url: str, hostname: str = "") -> bool:
    """`url` names a broker on this machine. Never true for a cluster (several nodes), which ensure does
    not start or reconfigure."""
    if is_cluster(url):
        return False
    host = urllib.parse.urlparse(url).hostname or "localhost"
    return host in LOCAL_HOSTS or (bool(hostname) and host == hostname)


def redact(url: str) -> str:
    """`url` with the password replaced by ***, for messages (in every item of a list of nodes)."""
    if is_cluster(url):
        return ",".join(redact(item) for item in url.split(","))
    try:
        parsed = urllib.parse.urlparse(url)
        if parsed.password is None:
            return url
    except ValueError:  # not a URL: show nothing of it that may hold a password
        return "<unparsable URL>" if "@" in url else url
    netloc = parsed.netloc.rsplit("@", 1)
    return parsed._replace(netloc=f"{parsed.username}:***@{netloc[1]}").geturl()


def decide(f: Facts) -> Plan:
    """What to do, from the facts alone (pure: no I/O)."""
    parsed = urllib.parse.urlparse(f.url)
    local = is_local(f.url, f.hostname)
    # The management plugin is only ever enabled on this machine's own broker.
    enable = ENABLE_MANAGEMENT if local and f.rabbitmq_plugins and not f.management_answers else None
    if f.broker_answers:
        return Plan(enable_management=enable)
    if f.login_refused:
        return Plan(problem=f"a broker answers but refuses AMQP_URL's credentials or vhost: {f.login_refused}")
    if is_cluster(f.url):
        return Plan(problem=f"AMQP_URL lists {len(f.url.split(','))} nodes (a cluster) and none answers: start"
                            " them where they run (docs/cluster.md); ensure starts only a single local broker")
    if not local:
        return Plan(problem=f"{parsed.hostname} is not this machine: start the broker there, or fix AMQP_URL")
    if parsed.scheme != "amqp":
        return Plan(problem=f"{parsed.scheme}:// needs a TLS listener, which a broker started here lacks")
    port = parsed.port or 5672
    if port != 5672:
        return Plan(problem=f"AMQP_URL names port {port}; a broker started here listens on 5672")
    if f.rabbitmq_server:
        prepare = ((*ENABLE_MANAGEMENT[:2], "--offline", ENABLE_MANAGEMENT[2]),) if f.rabbitmq_plugins else ()
        start = (("systemctl", "start", "rabbitmq-server"),) if f.systemd_unit else ()
        return Plan(prepare=prepare, start=start + (("rabbitmq-server", "-detached"),), enable_management=enable)
    if f.docker_compose and f.compose_file:
        # The image has the management plugin on; nothing to enable.
        return Plan(start=(("docker", "compose", "-f", f.compose_file, "up", "-d", "rabbitmq"),))
    if f.docker_compose:
        return Plan(problem=f"a Docker engine runs, but {COMPOSE_FILE} is missing (not a source checkout?)")
    return Plan(problem="neither rabbitmq-server nor a Docker engine with `docker compose` is available")


def answers(url: str | None = None, timeout: float = 2.0) -> bool:
    """True when an AMQP handshake succeeds at `url` (a plain TCP connect is not enough)."""
    return probe(url, timeout) is True


def probe(url: str | None = None, timeout: float = 2.0) -> bool | str:
    """True when an AMQP handshake (login included) succeeds at `url` (for a list of nodes: at one of them,
    tried in order); the broker's reason when a broker answers but refuses the login or the vhost (and no
    node accepts it); False when nothing answers."""
    import logging

    import pika
    import pika.exceptions

    pika_log = logging.getLogger("pika")
    level, pika_log.level = pika_log.level, logging.CRITICAL  # a refused probe is not an error worth a trace
    refused: str | None = None
    try:
        for node_url in amqp_urls(url):
            params = pika.URLParameters(node_url)
            params.socket_timeout = timeout
            params.connection_attempts = 1
            params.client_properties = {"connection_name": "mqfed-broker:ensure"}
            try:
                pika.BlockingConnection(params).close()
                return True
            except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError) as exc:
                refused = refused or str(exc) or type(exc).__name__
            except Exception:
                continue
        return refused or False
    finally:
        pika_log.level = level


def management_answers(url: str | None = None, timeout: float = 2.0) -> bool:
    """True when the management HTTP API answers on the broker's host (any HTTP status, 401 included); for
    a list of nodes, on any node's host."""
    for node_url in amqp_urls(url):
        host = url_host(urllib.parse.urlparse(node_url).hostname or "localhost")
        try:
            urllib.request.urlopen(f"http://{host}:{MANAGEMENT_PORT}/api/overview", timeout=timeout).close()
            return True
        except urllib.error.HTTPError:
            return True  # 401 without credentials: the API is there
        except (OSError, ValueError):
            continue
    return False


def _run(cmd: tuple[str, ...] | list[str], timeout: float = 120) -> bool:
    log.info("broker_ensure_run", cmd=" ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), timeout=timeout, capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("broker_ensure_command_failed", cmd=cmd[0], error=repr(exc))
        return False
    if proc.returncode != 0:
        log.warning("broker_ensure_command_failed", cmd=" ".join(cmd), rc=proc.returncode,
                    stderr=(proc.stderr or proc.stdout).strip()[-500:])
    return proc.returncode == 0


def _systemd_unit() -> bool:
    if not os.path.isdir("/run/systemd/system") or not shutil.which("systemctl"):
        return False
    units = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
    return any(os.path.exists(os.path.join(d, "rabbitmq-server.service")) for d in units)


def gather(url: str | None = None) -> Facts:
    """Look at this machine. The slow probes (Docker) run only when they can matter."""
    url = amqp_url(url)
    hostname = socket.gethostname()
    base = dict(url=url, hostname=hostname, rabbitmq_server=shutil.which("rabbitmq-server") is not None,
                rabbitmq_plugins=shutil.which("rabbitmq-plugins") is not None)
    found = probe(url)
    if found is True:
        local = is_local(url, hostname)
        return Facts(broker_answers=True, management_answers=local and management_answers(url), **base)
    if found:
        return Facts(broker_answers=False, login_refused=found, **base)
    docker = (not base["rabbitmq_server"] and shutil.which("docker") is not None
              and _run(["docker", "info"], timeout=20) and _run(["docker", "compose", "version"], timeout=20))
    return Facts(broker_answers=False, systemd_unit=base["rabbitmq_server"] and _systemd_unit(),
                 docker_compose=docker, compose_file=str(COMPOSE_FILE) if COMPOSE_FILE.is_file() else None,
                 **base)


def _wait(check: Callable[[], bool], seconds: float, every: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def _ensure(url: str, wait_s: float) -> tuple[bool, str | None]:
    facts = gather(url)
    plan = decide(facts)
    if not facts.broker_answers:
        if not plan.starts:
            log.error("broker_unreachable", problem=plan.problem)
            return False, plan.problem
        for cmd in plan.prepare:
            _run(cmd, timeout=60)
        if not any(_run(cmd, timeout=300 if cmd[0] == "docker" else 60) for cmd in plan.start):
            return False, "starting a broker failed: " + " / ".join(" ".join(c) for c in plan.start)
        if not _wait(lambda: answers(url), wait_s):
            log.error("broker_start_timed_out", waited_s=wait_s)
            return False, f"a broker was started but did not answer within {wait_s:.0f} s"
        log.info("broker_started")
    if plan.enable_management:
        # A node that just booted opens 15672 a little after 5672: give it a moment before enabling.
        grace = 0.0 if facts.broker_answers else 15.0
        if not _wait(lambda: management_answers(url), grace):
            if _run(plan.enable_management, timeout=60) and _wait(lambda: management_answers(url), 30.0):
                log.info("broker_management_enabled", api=f"http://localhost:{MANAGEMENT_PORT}/api/")
            else:
                log.warning("broker_management_unavailable", hint=" ".join(ENABLE_MANAGEMENT))
    return True, None


def ensure(url: str | None = None, wait_s: float = 90.0) -> bool:
    """Return True once a broker answers at `url` (starting a local one if needed and possible)."""
    return _ensure(amqp_url(url), wait_s)[0]


def main(argv: list[str] | None = None) -> int:
    url = amqp_url()
    ok, problem = _ensure(url, 90.0)
    if ok:
        nodes = [urllib.parse.urlparse(u) for u in amqp_urls(url)]
        where = ", ".join(f"{p.scheme}://{p.hostname}:{p.port or 5672}" for p in nodes)
        print(f"{'broker' if len(nodes) == 1 else 'cluster'} answers at {where}"
              f"{' (one node at least)' if len(nodes) > 1 else ''}"
              f" (management API: {'up' if management_answers(url) else 'off'})")
        return 0
    shown = redact(url)
    if problem and problem.startswith("a broker answers"):
        print(f"Cannot use the broker at {shown}: {problem}", file=sys.stderr)
    else:
        print(HOW_TO.format(url=shown) + (f"\n({problem})" if problem else ""), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
