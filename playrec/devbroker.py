"""A real single-node Apache Kafka broker (KRaft combined mode) for development and tests.

The broker's jars are resolved once by Maven from Maven Central (``playrec/kafka/pom.xml``) into a
cache outside the repository, then the broker runs as ``java -cp 'lib/*' kafka.Kafka
server.properties`` after ``kafka.tools.StorageTool format``. Its log4j output goes to
``<data_dir>/logs/server.log``; nothing is printed on the console.

Typical use::

    with DevBroker() as broker:           # temporary data dir, free loopback ports
        produce_to(broker.bootstrap)

or from a shell: ``playrec broker`` (prints ``... listening on 127.0.0.1:PORT``).
Set ``KAFKA_BOOTSTRAP=host:port`` to use an existing broker instead (see :func:`resolve_bootstrap`).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

try:  # POSIX only; without it the jar cache is filled without a lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "DevBroker",
    "add_arguments",
    "ensure_jars",
    "jar_dir",
    "main",
    "resolve_bootstrap",
    "run",
]

log = logging.getLogger("playrec.devbroker")

#: Apache Kafka release run by the development broker (keep in sync with kafka/pom.xml).
KAFKA_VERSION = "3.9.1"
SCALA_VERSION = "2.13"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
HOST = "127.0.0.1"

#: Partitions of auto-created topics: enough for several stream workers, cheap on a laptop.
DEFAULT_PARTITIONS = 8
#: JVM options; override with the PLAYREC_KAFKA_JVM_OPTS environment variable (shell syntax).
DEFAULT_JVM_OPTS = ("-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true")
_TOOL_JVM_OPTS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

_RESOURCES = Path(__file__).resolve().parent / "kafka"
POM = _RESOURCES / "pom.xml"
LOG4J_CONFIG = _RESOURCES / "log4j.properties"

_MVN_TIMEOUT_S = 900.0
_FORMAT_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0
_PROBE_TIMEOUT_MS = 5000
_LOG_TAIL_LINES = 40


class BrokerError(RuntimeError):
    """The development broker could not be provisioned, started or stopped."""


# --------------------------------------------------------------------------------------------------
# Configuration helpers
# --------------------------------------------------------------------------------------------------


def resolve_bootstrap() -> str | None:
    """Return the ``KAFKA_BOOTSTRAP`` environment variable (an existing broker) if set, else None."""
    value = os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    return value or None


def jar_dir(cache_dir: Path | None = None) -> Path:
    """Directory holding the broker's jars: ``<cache root>/kafka-<version>/lib``.

    The cache root is ``cache_dir``, else ``$PLAYREC_KAFKA_CACHE``, else
    ``${XDG_CACHE_HOME:-~/.cache}/playrec``.
    """
    if cache_dir is None:
        env = os.environ.get("PLAYREC_KAFKA_CACHE", "").strip()
        if env:
            cache_dir = Path(env)
        else:
            xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
            cache_dir = (Path(xdg) if xdg else Path.home() / ".cache") / "playrec"
    return Path(cache_dir).expanduser().resolve() / f"kafka-{KAFKA_VERSION}" / "lib"


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _jars_complete(lib: Path, digest: str) -> bool:
    stamp = lib / ".complete"
    try:
        return stamp.read_text().strip() == digest
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (blocks until other processes release it)."""
    with open(path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """Return the jar directory, filling it with Maven on first use.

    Safe to call from several processes at once: the download runs under a file lock into a
    temporary directory that is renamed into place only when complete.
    """
    lib = jar_dir(cache_dir)
    digest = _pom_digest()
    if _jars_complete(lib, digest):
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(lib.parent / ".lock"):
        if _jars_complete(lib, digest):  # another process filled it while we waited
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                f"Maven ('mvn') is not on PATH; it is needed once to fetch the Apache Kafka "
                f"{KAFKA_VERSION} jars into {lib}. Install Maven and a JDK >= 11 (e.g. "
                "'apt-get install maven openjdk-17-jre-headless' or 'brew install maven'), "
                "or set KAFKA_BOOTSTRAP=host:port to use an existing broker."
            )
        tmp = Path(tempfile.mkdtemp(prefix="lib.tmp-", dir=lib.parent))
        try:
            cmd = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp}",
                "-DincludeScope=runtime",
            ]
            log.info("fetching Apache Kafka %s jars with Maven into %s (first run only)", KAFKA_VERSION, lib)
            started = time.monotonic()
            try:
                proc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_MVN_TIMEOUT_S
                )
            except subprocess.TimeoutExpired as exc:
                raise BrokerError(f"Maven did not finish within {_MVN_TIMEOUT_S:.0f} s: {shlex.join(cmd)}") from exc
            if proc.returncode != 0:
                output = _tail_text(proc.stdout + proc.stderr, _LOG_TAIL_LINES)
                raise BrokerError(
                    f"Maven failed (exit {proc.returncode}) fetching the Kafka jars; is Maven Central "
                    f"reachable (proxy settings go in ~/.m2/settings.xml)?\n$ {shlex.join(cmd)}\n{output}"
                )
            main_jar = tmp / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar"
            if not main_jar.is_file():
                raise BrokerError(f"Maven finished but {main_jar.name} is missing from {tmp}")
            (tmp / ".complete").write_text(digest + "\n")
            if lib.exists():  # stale cache from another pom: move aside, then swap in the new one
                stale = Path(tempfile.mkdtemp(prefix="lib.old-", dir=lib.parent))
                os.replace(lib, stale / "lib")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, lib)
            log.info("fetched %d jars in %.1f s", len(list(lib.glob("*.jar"))), time.monotonic() - started)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            "'java' is not on PATH (nor in $JAVA_HOME/bin); Apache Kafka needs a JDK/JRE >= 11 "
            "(e.g. 'apt-get install openjdk-17-jre-headless'), or set KAFKA_BOOTSTRAP=host:port "
            "to use an existing broker."
        )
    return java


def _jvm_opts() -> list[str]:
    env = os.environ.get("PLAYREC_KAFKA_JVM_OPTS")
    return shlex.split(env) if env is not None else list(DEFAULT_JVM_OPTS)


def new_cluster_id() -> str:
    """A random Kafka cluster id (URL-safe base64 of a UUID, as ``kafka-storage random-uuid``)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids ids that look like command-line flags
            return cid


def _formatted_cluster_id(data_dir: Path) -> str | None:
    """The cluster id of already formatted storage in ``data_dir`` (a kept data dir), else None.

    ``StorageTool format --ignore-formatted`` still insists on the same cluster id, so a formatted
    directory is not formatted again.
    """
    try:
        text = (data_dir / "kafka-logs" / "meta.properties").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "cluster.id" and value.strip():
            return value.strip()
    return None


def _free_ports(count: int, exclude: set[int] | None = None) -> list[int]:
    """Distinct free TCP ports on the loopback interface (free now; the OS may reuse them later)."""
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((HOST, 0))
            port = s.getsockname()[1]
            if port not in (exclude or set()):
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def _check_port_free(port: int) -> None:
    """Fail unless `port` can be listened on; like Kafka's acceptor, connections of a previous broker
    on the port that linger in TIME_WAIT (a restart on the same port) do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise BrokerError(f"port {port} on {HOST} is not available ({exc}); pick another --port") from exc


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def server_properties(data_dir: Path, port: int, controller_port: int) -> str:
    """The broker's ``server.properties``: KRaft combined mode, one node, loopback only."""
    return f"""\
# Generated by playrec.devbroker for Apache Kafka {KAFKA_VERSION}. Development and tests only.
process.roles=broker,controller
node.id=1
# Static quorum (kraft.version 0): the controller port may change between runs of a kept data dir.
controller.quorum.voters=1@{HOST}:{controller_port}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}
advertised.listeners=PLAINTEXT://{HOST}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data_dir / "kafka-logs"}

# Topics: auto-created ones get {DEFAULT_PARTITIONS} partitions; a single replica everywhere.
auto.create.topics.enable=true
delete.topic.enable=true
num.partitions={DEFAULT_PARTITIONS}
default.replication.factor=1
min.insync.replicas=1

# Consumer groups and transactions (exactly-once) on one node.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
group.initial.rebalance.delay.ms=0

# Small machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.retention.hours=168
# Topics with a retention set (tests of a changelog that retention empties) are trimmed within a second.
log.retention.check.interval.ms=1000
"""


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return _tail_text(text, lines)


def _answers_metadata(bootstrap: str) -> bool:
    """True when the broker at ``bootstrap`` answers a metadata request listing at least one broker."""
    try:
        from kafka import KafkaAdminClient
    except ImportError as exc:  # pragma: no cover - kafka-python is a dependency
        raise BrokerError("kafka-python is required to probe the broker: pip install kafka-python") from exc
    wanted = {
        "bootstrap_servers": bootstrap,
        "client_id": "playrec-devbroker-probe",
        "request_timeout_ms": _PROBE_TIMEOUT_MS,
        "bootstrap_timeout_ms": _PROBE_TIMEOUT_MS,  # kafka-python >= 3
        "api_version_auto_timeout_ms": _PROBE_TIMEOUT_MS,  # kafka-python 2.x
        "reconnect_backoff_max_ms": 1000,
    }
    config = {k: v for k, v in wanted.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
    admin = None
    try:
        admin = KafkaAdminClient(**config)
        cluster = admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except Exception as exc:  # any client error just means "not ready yet"
        log.debug("broker %s not ready: %r", bootstrap, exc)
        return False
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel SIGTERM the broker if the process (thread) that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------------------------------

_live_brokers: weakref.WeakSet[DevBroker] = weakref.WeakSet()


@atexit.register
def _stop_live_brokers() -> None:
    for broker in list(_live_brokers):
        with contextlib.suppress(Exception):
            broker.stop()


class DevBroker:
    """A single-node Apache Kafka broker+controller on 127.0.0.1, run as a child JVM.

    Args:
        data_dir: where topics (``kafka-logs/``), ``server.properties`` and logs (``logs/``) live.
            Kept after :meth:`stop` and reused by the next start. Default: a temporary directory
            removed by :meth:`stop`.
        port: the client (PLAINTEXT) listener port. Default: a free port. The controller listener
            always gets a free port.
        cache_dir: root of the jar cache (see :func:`jar_dir`).

    On Linux the broker gets SIGTERM if the thread that started it dies, so a killed test run does
    not leave a JVM behind; start it from a long-lived thread (normally the main thread).
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None, cache_dir: Path | None = None) -> None:
        if port is not None and not 0 < port < 65536:
            raise BrokerError(f"invalid port {port}")
        self._requested_data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self._requested_port = port
        self.cache_dir = cache_dir
        self.data_dir: Path | None = self._requested_data_dir
        self.port: int | None = None
        self.controller_port: int | None = None
        self.cluster_id: str | None = None
        self._own_data_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- properties ----------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` of the running broker."""
        if self._proc is None or self.port is None:
            raise BrokerError("the broker is not running; call start() first")
        return f"{HOST}:{self.port}"

    @property
    def log_file(self) -> Path | None:
        """The broker's log4j log (``<data_dir>/logs/server.log``)."""
        return self.data_dir / "logs" / "server.log" if self.data_dir else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> str:
        """Fetch jars if needed, format storage, start the JVM, and wait until it answers metadata.

        ``timeout`` bounds formatting plus startup (not the one-time Maven download).
        Returns the bootstrap address ``"127.0.0.1:PORT"``.
        """
        with self._lock:
            if self._proc is not None:
                raise BrokerError(f"already started on {self.bootstrap}")
            lib = ensure_jars(self.cache_dir)
            java = _java()
            try:
                return self._start(java, lib, timeout)
            except BaseException:
                self._stop_locked()
                raise

    def _start(self, java: str, lib: Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        if self._requested_data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="playrec-kafka-"))
            self._own_data_dir = True
        else:
            self.data_dir = self._requested_data_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.data_dir
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)

        if self._requested_port is not None:
            _check_port_free(self._requested_port)
            self.port = self._requested_port
            (self.controller_port,) = _free_ports(1, exclude={self.port})
        else:
            self.port, self.controller_port = _free_ports(2)
        config = data_dir / "server.properties"
        config.write_text(server_properties(data_dir, self.port, self.controller_port))

        classpath = str(lib / "*")
        log4j = [f"-Dlog4j.configuration={LOG4J_CONFIG.as_uri()}", f"-Dkafka.logs.dir={logs}"]
        self.cluster_id = _formatted_cluster_id(data_dir)
        if self.cluster_id is None:
            self.cluster_id = new_cluster_id()
            fmt = [
                java,
                *_TOOL_JVM_OPTS,
                *log4j,
                "-cp",
                classpath,
                STORAGE_TOOL_CLASS,
                "format",
                "--config",
                str(config),
                "--cluster-id",
                self.cluster_id,
            ]
            log.debug("formatting storage: %s", shlex.join(fmt))
            try:
                proc = subprocess.run(
                    fmt,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=min(_FORMAT_TIMEOUT_S, max(1.0, deadline - time.monotonic())),
                )
            except subprocess.TimeoutExpired as exc:
                raise BrokerError(f"formatting the broker storage timed out: {shlex.join(fmt)}") from exc
            if proc.returncode != 0:
                raise BrokerError(
                    f"formatting the broker storage failed (exit {proc.returncode}):\n"
                    f"$ {shlex.join(fmt)}\n" + _tail_text(proc.stdout + proc.stderr, _LOG_TAIL_LINES)
                )
        else:
            log.info("reusing formatted storage in %s (cluster id %s)", data_dir, self.cluster_id)

        cmd = [java, *_jvm_opts(), *log4j, "-cp", classpath, MAIN_CLASS, str(config)]
        log.debug("starting broker: %s", shlex.join(cmd))
        console_path = logs / "console.log"
        self._console = console = open(console_path, "ab")  # noqa: SIM115 - closed by stop()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop the broker cleanly
            preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
        )
        _live_brokers.add(self)
        bootstrap = f"{HOST}:{self.port}"

        # Wait on a condition: the process must stay alive and answer a metadata request.
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise BrokerError(f"the broker exited with code {rc} during startup{self._see_log()}")
            if _port_open(self.port) and _answers_metadata(bootstrap):
                break
            if time.monotonic() >= deadline:
                raise BrokerError(f"the broker did not answer on {bootstrap} within {timeout:.0f} s{self._see_log()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.2)  # returns early if the JVM dies
        log.info(
            "Apache Kafka %s (KRaft) ready on %s in %.1f s (data %s)",
            KAFKA_VERSION,
            bootstrap,
            time.monotonic() - started,
            data_dir,
        )
        return bootstrap

    def _see_log(self) -> str:
        where = "" if self._own_data_dir else f"; full log in {self.log_file}"
        return f"{where}\n{self._diagnostics()}"

    def _diagnostics(self) -> str:
        parts = []
        if self.data_dir is not None:
            for path in (self.data_dir / "logs" / "console.log", self.data_dir / "logs" / "server.log"):
                tail = _tail_file(path)
                if tail:
                    parts.append(f"--- last lines of {path.name} ---\n{tail}")
        return "\n".join(parts) or "(the broker wrote no log)"

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout`` s) and remove a temporary data dir.

        Idempotent.
        """
        with self._lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("broker did not stop within %.0f s of SIGTERM; killing it", timeout)
                    proc.kill()
                    proc.wait()
            if proc is not None:
                log.info("broker on %s:%s stopped (exit %s)", HOST, self.port, proc.returncode)
        finally:
            _live_brokers.discard(self)
            console, self._console = self._console, None
            if console is not None:
                with contextlib.suppress(OSError):
                    console.close()
            if self._own_data_dir and self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir = None
                self._own_data_dir = False

    def __enter__(self) -> DevBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running on {HOST}:{self.port}" if self.running else "stopped"
        return f"<DevBroker Kafka {KAFKA_VERSION} {state} data_dir={self.data_dir}>"


# --------------------------------------------------------------------------------------------------
# CLI: `playrec broker`
# --------------------------------------------------------------------------------------------------


class _InterruptedError(Exception):
    """Raised in the main thread by SIGTERM/SIGINT."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``playrec broker`` to ``parser``."""
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        metavar="N",
        help="client listener port on 127.0.0.1 (default: a free port)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep topics and logs in DIR across runs (default: a temporary directory deleted on exit)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="root of the jar cache (default: $PLAYREC_KAFKA_CACHE or ~/.cache/playrec)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the broker to answer (default: 120)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``playrec broker``: start, print the address, serve until SIGTERM/SIGINT, stop. Exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="playrec broker: %(message)s")
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)

    def on_signal(signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt cleanup
            signal.signal(sig, signal.SIG_IGN)
        raise _InterruptedError(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    broker = DevBroker(data_dir=args.data_dir, port=args.port, cache_dir=args.cache_dir)
    try:
        try:
            address = broker.start(timeout=args.timeout)
            print(f"playrec broker: Apache Kafka {KAFKA_VERSION} (KRaft) listening on {address}", flush=True)
            print(
                f"playrec broker: log {broker.log_file}; use it with KAFKA_BOOTSTRAP={address}; "
                "stop with Ctrl-C or SIGTERM",
                file=sys.stderr,
                flush=True,
            )
            proc = broker._proc
            assert proc is not None
            rc = proc.wait()  # interrupted by the signal handler
            print(
                f"playrec broker: the broker exited unexpectedly with code {rc}\n{broker._diagnostics()}",
                file=sys.stderr,
            )
            return 1
        except _InterruptedError as exc:
            log.info("%s received; stopping the broker", exc)
            return 0
        except BrokerError as exc:
            print(f"playrec broker: error: {exc}", file=sys.stderr)
            return 1
        finally:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)  # do not interrupt the shutdown
            broker.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """``playrec broker [--port N] [--data-dir DIR]`` as a standalone entry point."""
    parser = argparse.ArgumentParser(
        prog="playrec broker",
        description=(
            f"Run a local Apache Kafka {KAFKA_VERSION} broker (KRaft, single node) on 127.0.0.1 for "
            "development. The first stdout line ends with the bootstrap address. Jars are fetched "
            "once with Maven. To use an existing broker instead, set KAFKA_BOOTSTRAP=host:port "
            "for the other playrec commands."
        ),
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
