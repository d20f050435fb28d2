"""Make sure a broker answers at AMQP_URL: start a local one where possible, else explain how.

Order: does AMQP_URL answer? -> `rabbitmq-server -detached` when that binary exists -> `docker compose -f
docker/compose.yml up -d rabbitmq` when a Docker engine runs -> exit 1 with instructions. Also enables the
management plugin (HTTP API on 15672) when `rabbitmq-plugins` exists. `python -m broker.ensure`.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.parse

from common.amqp import amqp_url
from common.logs import get_logger

log = get_logger(__name__)
HOW_TO = (
    "No RabbitMQ answers at {url}. Get one with either:\n"
    "  docker compose -f docker/compose.yml up -d rabbitmq\n"
    "  sudo apt-get install rabbitmq-server && rabbitmq-server -detached   (Debian/Ubuntu)\n"
    "or point AMQP_URL at an existing broker (amqp://user:pass@host:5672/vhost, amqps:// for TLS)."
)


def answers(url: str | None = None, timeout: float = 2.0) -> bool:
    """True when an AMQP handshake succeeds at `url` (a plain TCP connect is not enough)."""
    import logging

    import pika

    pika_log = logging.getLogger("pika")
    level, pika_log.level = pika_log.level, logging.CRITICAL  # a refused probe is not an error worth a trace
    params = pika.URLParameters(amqp_url(url))
    params.socket_timeout = timeout
    params.connection_attempts = 1
    params.client_properties = {"connection_name": "mqfed-broker:ensure"}
    try:
        pika.BlockingConnection(params).close()
        return True
    except Exception:
        return False
    finally:
        pika_log.level = level


def _is_local(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or "localhost"
    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname())


def _run(cmd: list[str], timeout: float = 120) -> bool:
    log.info("broker_ensure_run", cmd=" ".join(cmd))
    try:
        return subprocess.run(cmd, timeout=timeout, capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("broker_ensure_command_failed", cmd=cmd[0], error=repr(exc))
        return False


def _docker_running() -> bool:
    return shutil.which("docker") is not None and _run(["docker", "info"], timeout=20)


def management_answers(url: str | None = None) -> bool:
    host = urllib.parse.urlparse(amqp_url(url)).hostname or "localhost"
    try:
        with socket.create_connection((host, 15672), timeout=1.0):
            return True
    except OSError:
        return False


def enable_management() -> None:
    """Enable the management plugin (HTTP API and UI on 15672) when it is off and we can."""
    if not management_answers() and shutil.which("rabbitmq-plugins"):
        _run(["rabbitmq-plugins", "enable", "rabbitmq_management"], timeout=60)


def ensure(url: str | None = None, wait_s: float = 90.0) -> bool:
    """Return True once a broker answers at `url` (starting a local one if needed and possible)."""
    url = amqp_url(url)
    if answers(url):
        enable_management()
        return True
    if not _is_local(url):
        log.error("broker_unreachable", url=url, hint="remote broker: not starting one")
        return False
    started = False
    if shutil.which("rabbitmq-server"):
        started = _run(["rabbitmq-server", "-detached"], timeout=30)
    elif _docker_running():
        started = _run(["docker", "compose", "-f", "docker/compose.yml", "up", "-d", "rabbitmq"], timeout=300)
    if not started:
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if answers(url):
            enable_management()
            log.info("broker_started", url=url)
            return True
        time.sleep(1.0)
    return False


def main(argv: list[str] | None = None) -> int:
    url = amqp_url()
    if ensure(url):
        parsed = urllib.parse.urlparse(url)
        print(f"broker answers at {parsed.scheme}://{parsed.hostname}:{parsed.port or 5672}"
              f" (management API: {'up' if management_answers(url) else 'off'})")
        return 0
    print(HOW_TO.format(url=url), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
