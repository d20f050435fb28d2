"""A throwaway RabbitMQ node for fault tests that stop, kill and restart the broker.

The machine's shared broker (127.0.0.1:5672) is never touched: `PrivateBroker` starts a node of its own as
the current user, with its own node name (`mqfedfault-<random>@localhost`), AMQP port and distribution
port (both free ports on 127.0.0.1), and everything else under one temporary directory:

    <base>/home/.erlang.cookie   HOME of the node and of rabbitmqctl: a private cookie, ~/.erlang.cookie untouched
    <base>/rabbitmq.conf         listener on 127.0.0.1:<port>, nothing else
    <base>/enabled_plugins       `[].`: no management plugin, so 15672 (the shared broker's) stays free
    <base>/rabbitmq-env.conf     empty: /etc/rabbitmq/rabbitmq-env.conf (NODENAME=...) does not apply
    <base>/mnesia, <base>/log    data (quorum queues, streams, definitions) and logs

The node runs in the foreground of a child process (its own session), so the test owns it:

- `start()` launches it and waits until an AMQP handshake (login included) succeeds;
- `stop()` is graceful (`rabbitmqctl -n NODE stop`): clients see connection.close 320 CONNECTION_FORCED;
- `kill()` SIGKILLs the beam process: clients see their sockets reset, nothing is flushed by RabbitMQ;
- `restart(kill=False)` stops (or kills) and starts it again on the same data directory and the same
  port, so durable queues, streams and their messages survive and clients reconnect to the same URL;
- `close()` always leaves nothing behind: stops the node (kills it if it will not stop), kills what is left
  of its process group and removes the directory.

TLS mode (`PrivateBroker(tls=TlsFiles(cacert, cert, key))`): the node also listens for AMQP over TLS on
127.0.0.1:<tls_port> (`tls_url()`), verifies client certificates against `cacert` and refuses clients
without one (`ssl_options.verify = verify_peer`, `fail_if_no_peer_cert = true`). The plain listener stays:
readiness is checked there (then a TCP connect to the TLS port), and `url` (guest, loopback only) is there
for a test's set-up. With `external_auth=True` the node also offers SASL EXTERNAL, the user being the
client certificate's CN (`rabbitmq_auth_mechanism_ssl`, `ssl_cert_login_from = common_name`); PLAIN stays
on for `url`. Without `tls` the files are exactly those listed above.

`PrivateCluster(3)`: three such nodes joined into one cluster (for tests that kill one node of a
cluster): one Erlang cookie for all (`PrivateBroker(cookie=...)`), ports chosen so that no two nodes share
one (`taken_ports`), the second and third joined to the first with `rabbitmqctl stop_app`, `reset`,
`join_cluster`, `start_app`; the management API on each; `url` is the comma-separated list of the nodes'
URLs (what AMQP_URL takes for a cluster), `kill(i)` / `start(i)` SIGKILL and restart node i, `stop()`
kills every node's process group and removes the directory. Docs: docs/cluster.md.

`BrokerUnavailable` is raised when no RabbitMQ installation is found (`available()` tells beforehand);
`BrokerError` when one is found but the node does not come up (with the tail of its output and log).
Scripts are looked up in `$RABBITMQ_SCRIPTS_DIR`, `/usr/lib/rabbitmq/bin` (Debian/Ubuntu: `/usr/sbin`
only holds wrappers that switch to the `rabbitmq` user), then next to `rabbitmq-server` on PATH.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from broker.ensure import answers

START_TIMEOUT_S = 120.0  # a node boots in ~5 s here, 10-20 s on a loaded machine; generous on purpose
STOP_TIMEOUT_S = 60.0
_DEB_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


class BrokerUnavailable(RuntimeError):
    """No RabbitMQ installation on this machine (rabbitmq-server not found)."""


class BrokerError(RuntimeError):
    """The private node did not start or stop as asked."""


def scripts_dir() -> Path | None:
    """Directory holding the real rabbitmq-server and rabbitmqctl scripts, or None when not installed."""
    candidates = []
    if os.environ.get("RABBITMQ_SCRIPTS_DIR"):
        candidates.append(Path(os.environ["RABBITMQ_SCRIPTS_DIR"]))
    candidates.append(_DEB_SCRIPTS)
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for d in candidates:
        if (d / "rabbitmq-server").is_file() and (d / "rabbitmqctl").is_file():
            return d
    return None


def available() -> bool:
    return scripts_dir() is not None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port inside it can be taken while the node is down
    by a client reconnecting to it: connect() to an unbound local port may pick that very port as its own
    source port and connect to itself (TCP simultaneous open), and the node cannot listen there again."""
    low, _high = _ephemeral_range()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, max(10001, low))
        if _port_free(port):
            return port
    raise BrokerError("no free port below the ephemeral range")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener: the CA that client certificates must chain to, the server's
    certificate and its (unencrypted) key."""
    cacert: Path
    cert: Path
    key: Path


class PrivateBroker:
    """One private RabbitMQ node (see the module doc). Use as a context manager or call `close()`."""

    def __init__(self, base_dir: str | os.PathLike | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 tls: TlsFiles | None = None, external_auth: bool = False, management: bool = False,
                 cookie: str | None = None, taken_ports: set[int] | None = None) -> None:
        """cookie: the Erlang cookie (default: a random one; the nodes of a `PrivateCluster` share one).
        taken_ports: ports not to use, and to which this node adds its own (the nodes of a cluster pick
        theirs before any of them listens)."""
        if external_auth and tls is None:
            raise ValueError("external_auth needs tls (EXTERNAL takes the user from the client certificate)")
        scripts = scripts_dir()
        if scripts is None:
            raise BrokerUnavailable("rabbitmq-server is not installed (looked in $RABBITMQ_SCRIPTS_DIR,"
                                    f" {_DEB_SCRIPTS} and PATH)")
        self.scripts = scripts
        self.start_timeout_s = start_timeout_s
        self._own_base = base_dir is None
        self.base = Path(tempfile.mkdtemp(prefix="mqfed-rabbit-") if base_dir is None else base_dir).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.nodename = f"mqfedfault-{secrets.token_hex(4)}@localhost"
        taken = taken_ports if taken_ports is not None else set()

        def port() -> int:
            p = free_port()
            while p in taken:
                p = free_port()
            taken.add(p)
            return p

        self.port = port()
        self.dist_port = port()
        self.tls, self.external_auth = tls, external_auth
        self.tls_port: int | None = port() if tls is not None else None
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        # management=True: the HTTP API on a free port of its own
        self.management_port: int | None = port() if management else None
        self.cookie = cookie
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._write_files()

    # -- files and environment ---------------------------------------------------------------------------
    def _write_files(self) -> None:
        home = self.base / "home"
        for d in (home, self.base / "mnesia", self.base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie or secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = info\n" + self._tls_conf()
            + (f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
               if self.management_port else ""))
        plugins = ",".join(p for p, on in (("rabbitmq_auth_mechanism_ssl", self.external_auth),
                                           ("rabbitmq_management", self.management_port is not None)) if on)
        (self.base / "enabled_plugins").write_text(f"[{plugins}].\n")
        (self.base / "rabbitmq-env.conf").write_text("")

    def _tls_conf(self) -> str:
        """rabbitmq.conf lines of TLS mode ("" without it)."""
        if self.tls is None:
            return ""
        lines = [f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                 f"ssl_options.cacertfile = {Path(self.tls.cacert).resolve()}",
                 f"ssl_options.certfile = {Path(self.tls.cert).resolve()}",
                 f"ssl_options.keyfile = {Path(self.tls.key).resolve()}",
                 "ssl_options.verify = verify_peer",
                 "ssl_options.fail_if_no_peer_cert = true"]
        if self.external_auth:
            lines += ["auth_mechanisms.1 = EXTERNAL", "auth_mechanisms.2 = PLAIN",
                      "ssl_cert_login_from = common_name"]
        return "".join(line + "\n" for line in lines)

    def _management_answers(self) -> bool:
        """True without the management API, else once it answers HTTP (401 included)."""
        if self.management_url is None:
            return True
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.management_url + "/api/overview", timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    @property
    def management_url(self) -> str | None:
        """The management HTTP API (management=True), for broker/admin.py (MQFED_MANAGEMENT_URL)."""
        return f"http://127.0.0.1:{self.management_port}" if self.management_port else None

    def tls_url(self, host: str = "localhost", userinfo: str = "") -> str:
        """amqps:// URL of the TLS listener; `host` must be a name the server certificate holds, `userinfo`
        e.g. "user:password@" (empty: no credentials in the URL, for SASL EXTERNAL)."""
        if self.tls_port is None:
            raise BrokerError("this node has no TLS listener (PrivateBroker(tls=...))")
        return f"amqps://{userinfo}{host}:{self.tls_port}/%2F"

    def env(self) -> dict[str, str]:
        """Environment for rabbitmq-server / rabbitmqctl of this node (no inherited RABBITMQ_* settings)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RABBITMQ_") and k not in ("NOTIFY_SOCKET", "ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS")}
        b = self.base
        env.update({
            "HOME": str(b / "home"),  # the erlang cookie of the node and of rabbitmqctl
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),  # absent on purpose
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(b / "rabbit.pid"),
            # Distribution on loopback only; no busy-waiting schedulers on a shared 2-core machine.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none",
        })
        return env

    def _ctl(self, *args: str, timeout: float = STOP_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.scripts / "rabbitmqctl"), "-n", self.nodename, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout, cwd=self.base)

    # -- state -------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self, timeout: float = 2.0) -> bool:
        """An AMQP handshake succeeds on the plain listener (and, in TLS mode, the TLS port accepts TCP)."""
        if not answers(self.url, timeout):
            return False
        if self.tls_port is None:
            return True
        try:
            socket.create_connection(("127.0.0.1", self.tls_port), timeout=timeout).close()
            return True
        except OSError:
            return False

    def beam_pid(self) -> int | None:
        """Pid of the node's Erlang VM (beam.smp), found among the children of the process we started."""
        if not self.running:
            return None
        pid_file = self.base / "rabbit.pid"
        try:
            pid = int(pid_file.read_text().strip())
            if self._is_our_beam(pid):
                return pid
        except (OSError, ValueError):
            pass
        for pid in self._descendants(self.proc.pid):
            if self._is_our_beam(pid):
                return pid
        return None

    def _is_our_beam(self, pid: int) -> bool:
        """A beam.smp started with this node's environment (the node name is not on its command line:
        RabbitMQ starts distribution itself, from RABBITMQ_NODENAME)."""
        try:
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return exe.endswith(b"beam.smp") and f"RABBITMQ_NODENAME={self.nodename}".encode() in environ

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
        return out

    def _output_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.base / "server.out", self.base / "log" / f"{self.nodename}.log"):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "PrivateBroker":
        """Start the node (same data and port as before, if it ran already) and wait until AMQP answers."""
        if self.running:
            raise BrokerError(f"{self.nodename} is already running")
        deadline = time.monotonic() + self.start_timeout_s
        # a restart reuses the ports: wait until the old node let go
        for port in (self.port, self.dist_port, self.tls_port):
            while port is not None and not _port_free(port) and time.monotonic() < deadline:
                time.sleep(0.2)
        out = open(self.base / "server.out", "ab")
        try:
            self.proc = subprocess.Popen([str(self.scripts / "rabbitmq-server")], env=self.env(), cwd=self.base,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            out.close()
        self.starts += 1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"rabbitmq-server for {self.nodename} exited with {self.proc.returncode}"
                                  f" while starting\n{self._output_tail()}")
            if self.answers() and self._management_answers():
                return self
            time.sleep(0.5)
        self._kill_group()
        raise BrokerError(f"{self.nodename} did not answer AMQP on port {self.port} within"
                          f" {self.start_timeout_s:.0f} s\n{self._output_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop (`rabbitmqctl stop`): connections are closed with 320 CONNECTION_FORCED."""
        if not self.running:
            return
        try:
            result = self._ctl("stop", timeout=timeout)
            failed = result.returncode != 0 and (result.stderr or result.stdout).strip()
        except subprocess.TimeoutExpired:
            failed = f"rabbitmqctl stop timed out after {timeout:.0f} s"
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            raise BrokerError(f"{self.nodename} did not stop within {timeout:.0f} s"
                              f" ({failed or 'rabbitmqctl stop returned 0'}); killed it") from None

    def kill(self) -> None:
        """Abrupt stop: SIGKILL of the Erlang VM (nothing closed, nothing flushed by RabbitMQ)."""
        if not self.running:
            return
        pid = self.beam_pid()
        if pid is None:
            raise BrokerError(f"no beam.smp process of {self.nodename} under pid {self.proc.pid}")
        os.kill(pid, signal.SIGKILL)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill_group()

    def restart(self, kill: bool = False) -> None:
        """Stop (or, with kill=True, SIGKILL) the node and start it again on the same data and port."""
        self.kill() if kill else self.stop()
        self.start()

    def _kill_group(self) -> None:
        """SIGKILL the process group we started (the script, the VM and its helpers) and reap it.

        Only while our child is not reaped yet: its pid (the group id) cannot have been reused then."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop the node whatever state it is in and remove its files."""
        try:
            if self.running:
                try:
                    self.stop(timeout=30)
                except BrokerError:
                    pass
            self._kill_group()  # helpers (erl_child_setup, inet_gethost) and anything left of a failed start
        finally:
            if self._own_base:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PrivateBroker":
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.close()


class PrivateCluster:
    """`size` private RabbitMQ nodes on this machine joined into one cluster (see the module doc).

    Each node is a `PrivateBroker` (own node name, AMQP, distribution and management ports, data directory
    under one temporary directory), all with one Erlang cookie. `start()` boots the first node, then boots
    each other one and joins it to the first (`rabbitmqctl stop_app`, `reset`, `join_cluster`,
    `start_app`), and returns once every node runs in the cluster. `url` is the comma-separated list of the
    nodes' URLs (guest, loopback only), what mqfed's AMQP_URL takes for a cluster; `urls` the same as a
    list. `kill(i)` SIGKILLs node i's Erlang VM; `start(i)` starts it again on its data and port and waits
    until it is back in the cluster. `stop()` SIGKILLs every node's process group and removes the directory;
    no process of ours is left (idempotent). The management API runs on every node (`management_urls`).
    """

    def __init__(self, size: int = 3, management: bool = True, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.base = Path(tempfile.mkdtemp(prefix="mqfed-cluster-")).resolve()
        cookie, taken = secrets.token_hex(16).upper(), set[int]()
        try:
            self.nodes = [PrivateBroker(self.base / f"node{i + 1}", start_timeout_s, management=management,
                                        cookie=cookie, taken_ports=taken) for i in range(size)]
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.start_timeout_s = start_timeout_s

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (AMQP_URL for a cluster)."""
        return ",".join(self.urls)

    @property
    def management_urls(self) -> list[str]:
        return [url for url in (n.management_url for n in self.nodes) if url]

    @property
    def management_url(self) -> str | None:
        """The management API of every node, comma-separated (MQFED_MANAGEMENT_URL: broker/admin.py tries
        them in turn), or None without management."""
        return ",".join(self.management_urls) or None

    def node_of(self, erlang_node: str) -> int:
        """The index of the node named `erlang_node` (e.g. a queue leader's node in the management API)."""
        return next(i for i, n in enumerate(self.nodes) if n.nodename == erlang_node)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self, i: int | None = None) -> "PrivateCluster":
        """Without `i`: boot and join every node (see the class doc). With `i`: start node i again (after
        `kill(i)`) and wait until the cluster runs it."""
        if i is not None:
            self.nodes[i].start()
            self.wait_running(self.start_timeout_s)
            return self
        try:
            seed = self.nodes[0].start()
            for node in self.nodes[1:]:
                node.start()
                for args in (("stop_app",), ("reset",), ("join_cluster", seed.nodename), ("start_app",)):
                    result = node._ctl(*args, timeout=self.start_timeout_s)  # noqa: SLF001 - our own node
                    if result.returncode != 0:
                        raise BrokerError(f"rabbitmqctl {' '.join(args)} on {node.nodename} failed:"
                                          f" {(result.stderr or result.stdout).strip()}\n{node._output_tail()}")
            self.wait_running(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def running_nodes(self) -> set[str]:
        """Erlang names of the nodes the cluster runs, as a running node sees them (empty if none answers)."""
        import json

        for node in self.nodes:
            if not node.running:
                continue
            try:
                result = node._ctl("cluster_status", "--formatter", "json", timeout=30)  # noqa: SLF001
                if result.returncode == 0:
                    return set(json.loads(result.stdout)["running_nodes"])
            except (subprocess.TimeoutExpired, ValueError, KeyError):
                continue
        return set()

    def wait_running(self, timeout: float) -> None:
        """Wait until the cluster runs exactly the nodes whose processes run and each of them answers AMQP
        (and its management API, when on)."""
        deadline = time.monotonic() + timeout
        want = {n.nodename for n in self.nodes if n.running}
        while time.monotonic() < deadline:
            if (self.running_nodes() == want
                    and all(n.answers() and n._management_answers() for n in self.nodes if n.running)):  # noqa: SLF001
                return
            time.sleep(0.5)
        raise BrokerError(f"the cluster does not run {sorted(want)} after {timeout:.0f} s"
                          f" (running: {sorted(self.running_nodes())})")

    def kill(self, i: int) -> None:
        """SIGKILL node i's Erlang VM (its clients see their sockets reset)."""
        self.nodes[i].kill()

    def stop(self) -> None:
        """SIGKILL every node's process group (its data is thrown away: nothing to stop gracefully for) and
        remove the directory; idempotent."""
        try:
            for node in self.nodes:
                node._kill_group()  # noqa: SLF001 - the script, the VM and its helpers, while not reaped
                node.close()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PrivateCluster":
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()
