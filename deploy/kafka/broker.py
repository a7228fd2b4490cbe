"""Start, stop and inspect a single-node Apache Kafka 4.x broker (KRaft) from Maven Central jars.

    python -m deploy.kafka.broker start|stop|status|bootstrap

The jars are resolved by ``deploy/kafka/pom.xml`` into ``deploy/kafka/lib`` (``make kafka-jars``,
or automatically on the first ``start``). The broker's data, config and log live in
``.run/kafka`` (git-ignored). When ``KAFKA_BOOTSTRAP_SERVERS`` is set, that cluster is used
instead and nothing is started.

Settings (environment): ``SAGA_KAFKA_PORT`` (default 39092; the controller listens on the next
port), ``SAGA_KAFKA_HEAP`` (default ``512m``), ``SAGA_RUN_DIR`` (default ``<repo>/.run``),
``SAGA_KAFKA_PROPERTIES`` (broker properties added to the generated ones, ``;``-separated).

When the port is taken (say, another clone's broker), ``start`` uses a Kafka broker that answers
there, or else starts this one on the next free port pair; either way it records the bootstrap it
chose in ``.run/kafka/bootstrap``, which ``bootstrap``, the tests and the demo read.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import click

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent
_LIB = _HERE / "lib"

_LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
"""

# Internal topics get one partition and replication factor 1: a single node cannot replicate,
# and 50 partitions each for offsets and transactions take long to create on 2 cores.
_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.backoff.ms=1000
# A transaction left open by a killed producer blocks read_committed readers until it times
# out; keep the ceiling short for a development broker.
transaction.max.timeout.ms=900000
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
"""


class BrokerError(RuntimeError):
    """The broker could not be started, stopped or reached; the message says why."""


@dataclass(frozen=True)
class BrokerLayout:
    """Where one node runs. The defaults of the last three fields are the single-node broker;
    a node of a cluster (``ClusterLayout.node``) or a broker with other listeners (a test's
    SASL broker) sets them."""

    port: int
    controller_port: int
    heap: str
    run_dir: Path
    node_id: int = 1
    #: ``controller.quorum.voters``; empty: this node alone.
    voters: str = ""
    #: Appended to the generated ``server.properties``: a later key overrides an earlier one
    #: (``java.util.Properties``), so this can change listeners, replication factors, ...
    extra_properties: str = ""
    #: Extra arguments of ``kafka-storage format`` (e.g. ``--add-scram ...``).
    format_args: tuple[str, ...] = ()
    #: What a client needs to connect (credentials), to tell when the broker answers.
    client_config: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls) -> BrokerLayout:
        port = int(os.environ.get("SAGA_KAFKA_PORT", "39092"))
        run_dir = Path(os.environ.get("SAGA_RUN_DIR", str(_REPO / ".run"))) / "kafka"
        heap = os.environ.get("SAGA_KAFKA_HEAP", "512m")
        extra = extra_properties(os.environ.get("SAGA_KAFKA_PROPERTIES", ""))
        return cls(port, port + 1, heap, run_dir, extra_properties=extra)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "broker.pid"

    @property
    def config_file(self) -> Path:
        return self.run_dir / "server.properties"

    @property
    def bootstrap_file(self) -> Path:
        """The bootstrap ``start`` chose last (the configured port may have been taken)."""
        return self.run_dir / "bootstrap"

    def on_port(self, port: int) -> BrokerLayout:
        return replace(self, port=port, controller_port=port + 1)

    def server_properties(self) -> str:
        voters = self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}"
        text = _SERVER_PROPERTIES.format(
            node_id=self.node_id,
            voters=voters,
            port=self.port,
            controller_port=self.controller_port,
            data=self.data_dir,
        )
        return text + self.extra_properties


def extra_properties(text: str) -> str:
    """``SAGA_KAFKA_PROPERTIES``: broker properties separated by ``;`` or newlines, appended to
    the generated ones (a later key wins), e.g. to measure a broker setting with ``make bench``.
    A part without ``key=value`` is refused here rather than by a broker that will not start."""
    lines = []
    for part in text.replace(";", "\n").splitlines():
        part = part.strip()
        if not part:
            continue
        key, eq, _value = part.partition("=")
        if not eq or not key.strip():
            raise BrokerError(f"SAGA_KAFKA_PROPERTIES: {part!r} is not key=value")
        lines.append(part)
    return "".join(f"{line}\n" for line in lines)


def external_bootstrap() -> str | None:
    """The cluster named by ``KAFKA_BOOTSTRAP_SERVERS``, if any: then nothing is started."""
    value = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    return value or None


def recorded_bootstrap(layout: BrokerLayout) -> str | None:
    """The bootstrap the last ``start`` with this run dir chose, if it recorded one."""
    try:
        value = layout.bootstrap_file.read_text().strip()
    except OSError:
        return None
    return value or None


def current_bootstrap(layout: BrokerLayout) -> str:
    """Where clients should connect: ``KAFKA_BOOTSTRAP_SERVERS``, else what ``start`` chose."""
    return external_bootstrap() or recorded_bootstrap(layout) or layout.bootstrap


def ensure_jars() -> None:
    if _LIB.is_dir() and any(_LIB.glob("kafka_2.13-*.jar")):
        return
    click.echo("resolving Apache Kafka jars from Maven Central (deploy/kafka/pom.xml) ...")
    cmd = [
        "mvn", "-q", "-B", "-f", str(_HERE / "pom.xml"),
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={_LIB}",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True)
    except FileNotFoundError as exc:
        raise BrokerError("Maven ('mvn') is needed to fetch the Kafka jars; install it") from exc
    except subprocess.CalledProcessError as exc:
        raise BrokerError(
            f"Maven could not resolve the Kafka jars (exit {exc.returncode})"
        ) from exc


# Brokers this process started, so that stopping one also reaps it (no zombie, and no
# "subprocess still running" warning when a test's broker handle is collected).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _read_pid(layout: BrokerLayout) -> int | None:
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A recycled pid would not have our config file on its command line.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if str(layout.config_file).encode() in cmdline else None


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class StartPlan:
    """What ``start`` does: use the broker that answers (``reuse``) or start one (``start``)."""

    action: Literal["reuse", "start"]
    layout: BrokerLayout
    note: str = ""  # the line that tells the user, when the plan is not the plain one

    @property
    def bootstrap(self) -> str:
        return self.layout.bootstrap


def plan_start(
    layout: BrokerLayout,
    *,
    port_in_use: Callable[[int], bool] = _port_in_use,
    port_free: Callable[[int], bool] = _port_free,
    kafka_answers: Callable[[str], bool] = lambda bootstrap: is_ready(bootstrap),
    tries: int = 100,
) -> StartPlan:
    """Decide where the broker of ``layout`` runs when no broker of ours does.

    A Kafka broker on the configured port (another clone's development broker, typically) is
    used as it is. A port taken by anything else moves this broker to the next free pair of
    ports, preferring the pair recorded by an earlier start so that a restart keeps its port.
    """
    taken = [p for p in (layout.port, layout.controller_port) if port_in_use(p)]
    if not taken:
        return StartPlan("start", layout)
    if layout.port in taken and kafka_answers(layout.bootstrap):
        return StartPlan(
            "reuse",
            layout,
            f"a Kafka broker not started from here already answers at {layout.bootstrap}: using it",
        )
    candidates: list[int] = []
    recorded = recorded_bootstrap(layout)
    if recorded and recorded.rpartition(":")[2].isdigit():
        candidates.append(int(recorded.rpartition(":")[2]))
    candidates += [layout.port + 2 * n for n in range(1, tries + 1)]
    for port in candidates:
        if port != layout.port and port_free(port) and port_free(port + 1):
            moved = layout.on_port(port)
            return StartPlan(
                "start",
                moved,
                f"port {taken[0]} is taken by another process that is not a Kafka broker: "
                f"starting the broker at {moved.bootstrap} instead",
            )
    raise BrokerError(
        f"port {taken[0]} on 127.0.0.1 is taken and no free port pair was found above it; "
        "set SAGA_KAFKA_PORT to a free port (the controller uses the port after it)"
    )


def is_ready(
    bootstrap: str, timeout: float = 2.0, client_config: Mapping[str, str] | None = None
) -> bool:
    """True when the cluster answers a metadata request (``client_config``: credentials)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**(client_config or {}), "bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except Exception:
        return False
    return True


def _java_command(layout: BrokerLayout, main_class: str, *args: str) -> list[str]:
    return [
        "java",
        f"-Xms{min(256, _megabytes(layout.heap))}m",
        f"-Xmx{layout.heap}",
        "-XX:+UseSerialGC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={layout.run_dir / 'log4j2.properties'}",
        "-cp",
        f"{_LIB}/*",
        main_class,
        *args,
    ]


def _megabytes(heap: str) -> int:
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    suffix = heap[-1].lower()
    return int(float(heap[:-1]) * units[suffix]) if suffix in units else int(heap) // 2**20


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _format_storage(layout: BrokerLayout, cluster_id: str | None = None) -> None:
    if (layout.data_dir / "meta.properties").exists():
        return
    cluster_id = cluster_id or new_cluster_id()
    cmd = _java_command(
        # "--cluster-id=<id>": a url-safe id may start with "-", which argparse would take
        # for an option when given as a separate argument (it did, once in 64 runs).
        layout, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
        "-c", str(layout.config_file), "--ignore-formatted", *layout.format_args,
    )  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"formatting the KRaft storage failed:\n{result.stdout}{result.stderr}")


def start(layout: BrokerLayout, timeout: float = 120.0) -> str:
    """Start the broker unless it runs already; return its bootstrap servers once it answers."""
    external = external_bootstrap()
    if external:
        click.echo(f"KAFKA_BOOTSTRAP_SERVERS is set: using {external}, starting nothing")
        return external
    if _read_pid(layout) is not None:
        # Ours runs already, maybe on the port an earlier start moved it to.
        running = recorded_bootstrap(layout) or layout.bootstrap
        if is_ready(running):
            click.echo(f"broker already running at {running}")
            return running
    plan = plan_start(layout)
    if plan.note:
        click.echo(plan.note)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    if plan.action == "reuse":
        layout.bootstrap_file.write_text(plan.bootstrap + "\n")
        return plan.bootstrap
    layout = plan.layout
    ensure_jars()
    began = time.monotonic()
    _write_config(layout)
    _format_storage(layout)
    proc = _launch(layout)
    layout.bootstrap_file.write_text(layout.bootstrap + "\n")
    deadline = began + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(
                f"the broker exited with code {proc.returncode}; see {layout.log_file} "
                f"and {layout.run_dir / 'stdout.log'}"
            )
        if is_ready(layout.bootstrap, timeout=1.0, client_config=layout.client_config):
            click.echo(
                f"broker started at {layout.bootstrap} in {time.monotonic() - began:.1f}s "
                f"(pid {proc.pid}, log {layout.log_file})"
            )
            return layout.bootstrap
        time.sleep(0.3)
    proc.kill()
    raise BrokerError(f"the broker did not answer within {timeout:.0f}s; see {layout.log_file}")


def _write_config(layout: BrokerLayout) -> None:
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(layout.server_properties())
    (layout.run_dir / "log4j2.properties").write_text(_LOG4J2.format(log=layout.log_file))


def _launch(layout: BrokerLayout) -> subprocess.Popen[bytes]:
    """Start the node's JVM (configured and formatted already) and record its pid."""
    with open(layout.run_dir / "stdout.log", "ab") as out:
        proc = subprocess.Popen(
            _java_command(layout, "kafka.Kafka", str(layout.config_file)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the shell that started it
        )
    layout.pid_file.write_text(str(proc.pid))
    _CHILDREN[proc.pid] = proc
    return proc


def stop(layout: BrokerLayout, timeout: float = 60.0) -> None:
    if external_bootstrap():
        click.echo("KAFKA_BOOTSTRAP_SERVERS is set: nothing to stop")
        return
    pid = _read_pid(layout)
    if pid is None:
        recorded = recorded_bootstrap(layout)
        if recorded:
            # A broker this checkout only used (another clone's) is not ours to stop.
            click.echo(f"no broker of this checkout running (it used {recorded}); nothing stopped")
        else:
            click.echo("broker not running")
        layout.pid_file.unlink(missing_ok=True)
        layout.bootstrap_file.unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)  # a clean shutdown, so the next start skips log recovery
    deadline = time.monotonic() + timeout
    child = _CHILDREN.pop(pid, None)
    while time.monotonic() < deadline and _read_pid(layout) is not None:
        time.sleep(0.2)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)  # reaps it (an exited child stays a zombie until then)
    if _read_pid(layout) is not None:
        os.kill(pid, signal.SIGKILL)
        click.echo(f"broker (pid {pid}) did not stop within {timeout:.0f}s; killed it")
    else:
        click.echo(f"broker (pid {pid}) stopped")
    layout.pid_file.unlink(missing_ok=True)
    layout.bootstrap_file.unlink(missing_ok=True)


def status(layout: BrokerLayout) -> bool:
    external = external_bootstrap()
    target = current_bootstrap(layout)
    ready = is_ready(target)
    pid = None if external else _read_pid(layout)
    where = "external cluster" if external else f"pid {pid}" if pid else "not started by us"
    click.echo(f"{target}: {'answering' if ready else 'not answering'} ({where})")
    return ready


# --------------------------------------------------------------------------- SASL/SCRAM + ACLs


def sasl_scram_layout(
    port: int,
    run_dir: Path,
    users: Mapping[str, str],
    *,
    super_users: tuple[str, ...] = ("admin",),
    heap: str = "384m",
) -> BrokerLayout:
    """A single node whose client listener takes SASL_PLAINTEXT with SCRAM-SHA-512 and whose
    authorizer (KRaft's StandardAuthorizer) denies what no ACL allows: how a managed cluster
    (Confluent Cloud, MSK, Aiven) behaves, without TLS. ``users`` (name -> password) are created
    when the storage is formatted; ``admin`` must be one of them: it is the super user (the
    broker's own inter-broker identity); so are ``super_users``. Others get only what ACLs
    grant.
    """
    if "admin" not in users:
        raise ValueError("users must include 'admin' (the super user)")
    scram = tuple(
        arg
        for name, password in users.items()
        for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
    )
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="admin" password="{users["admin"]}";'
    )
    extra = f"""\
listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}
advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={jaas}
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
# ANONYMOUS: the node's broker half talking to its controller half over the PLAINTEXT
# controller listener (127.0.0.1 only); clients reach only the SASL listener.
super.users={";".join(f"User:{name}" for name in sorted({"admin", *super_users}))};User:ANONYMOUS
"""
    client = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "admin",
        "sasl.password": users["admin"],
    }
    return BrokerLayout(
        port,
        port + 1,
        heap,
        run_dir,
        extra_properties=extra,
        format_args=scram,
        client_config=client,
    )


# --------------------------------------------------------------------------- a cluster

# Combined mode (each node is broker and controller), not a separate controller quorum: a
# separate quorum that survives the loss of one controller needs three controller JVMs beside the
# three brokers, six JVMs on a 2-core test machine; combined mode needs three. It is also the
# harder case for the fault test: the node a test kills may be the active controller as well as a
# partition leader, so the controller election and the partition leader election happen at once.
# Production clusters with many brokers should run a separate quorum (docs/deploy.md).
_CLUSTER_PROPERTIES = """\
# A cluster: internal topics replicated like the namespace's topics. Few partitions for the
# offsets and transaction logs (the default 50 each, times three replicas, is slow to create on
# two cores); enough that their leaders are spread over the nodes.
default.replication.factor={rf}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=3
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}
"""


@dataclass(frozen=True)
class ClusterLayout:
    """An N-node KRaft cluster on 127.0.0.1: node ``i`` (1..N) listens on ``base_port + 2(i-1)``
    (its controller on the port after it) and lives in ``run_dir/node-<i>``."""

    nodes: int
    base_port: int
    heap: str
    run_dir: Path

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got {self.nodes}")

    @classmethod
    def from_env(cls) -> ClusterLayout:
        return cls(
            nodes=int(os.environ.get("SAGA_KAFKA_CLUSTER_NODES", "3")),
            base_port=int(os.environ.get("SAGA_KAFKA_CLUSTER_PORT", "39192")),
            # 384m each: three nodes and the processes under test fit a small machine.
            heap=os.environ.get("SAGA_KAFKA_HEAP", "384m"),
            run_dir=Path(os.environ.get("SAGA_RUN_DIR", str(_REPO / ".run"))) / "kafka-cluster",
        )

    @property
    def node_ids(self) -> range:
        return range(1, self.nodes + 1)

    @property
    def replication_factor(self) -> int:
        return min(3, self.nodes)

    @property
    def min_insync_replicas(self) -> int:
        return min(2, self.replication_factor)

    @property
    def ports(self) -> list[int]:
        """Every port the cluster listens on."""
        return [self.base_port + n for n in range(2 * self.nodes)]

    def node(self, node_id: int) -> BrokerLayout:
        if node_id not in self.node_ids:
            raise ValueError(f"node {node_id} is not in 1..{self.nodes}")
        port = self.base_port + 2 * (node_id - 1)
        first = self.base_port + 1  # node i's controller: first + 2(i-1)
        voters = ",".join(f"{i}@127.0.0.1:{first + 2 * (i - 1)}" for i in self.node_ids)
        extra = _CLUSTER_PROPERTIES.format(
            rf=self.replication_factor, min_isr=self.min_insync_replicas
        )
        return BrokerLayout(
            port, port + 1, self.heap, self.run_dir / f"node-{node_id}", node_id, voters, extra
        )

    def node_bootstrap(self, node_id: int) -> str:
        return self.node(node_id).bootstrap

    @property
    def bootstrap(self) -> str:
        return ",".join(self.node_bootstrap(i) for i in self.node_ids)

    @property
    def cluster_id_file(self) -> Path:
        return self.run_dir / "cluster.id"


def broker_ids(bootstrap: str, timeout: float = 2.0) -> set[int] | None:
    """The ids of the brokers the cluster's metadata lists (fenced ones are left out), or None
    when no broker at ``bootstrap`` answers."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except Exception:
        return None
    return set(metadata.brokers)


def node_pid(cluster: ClusterLayout, node_id: int) -> int | None:
    """The pid of node ``node_id`` if it runs."""
    return _read_pid(cluster.node(node_id))


def _cluster_id(cluster: ClusterLayout) -> str:
    try:
        value = cluster.cluster_id_file.read_text().strip()
    except OSError:
        value = ""
    if not value:
        value = new_cluster_id()
        cluster.run_dir.mkdir(parents=True, exist_ok=True)
        cluster.cluster_id_file.write_text(value + "\n")
    return value


def _launch_node(cluster: ClusterLayout, node_id: int) -> subprocess.Popen[bytes] | None:
    """Configure, format (first time) and start node ``node_id`` unless it runs already."""
    layout = cluster.node(node_id)
    if _read_pid(layout) is not None:
        return None
    # Something that listens, not a port that cannot be bound: right after a kill, the node's
    # own old connections hold its ports in TIME_WAIT, and Kafka binds with SO_REUSEADDR.
    taken = [p for p in (layout.port, layout.controller_port) if _port_in_use(p)]
    if taken:
        raise BrokerError(
            f"port {taken[0]} of cluster node {node_id} is taken; set SAGA_KAFKA_CLUSTER_PORT "
            f"to the first of {2 * cluster.nodes} free ports"
        )
    _write_config(layout)
    _format_storage(layout, _cluster_id(cluster))
    return _launch(layout)


def _wait_nodes(
    cluster: ClusterLayout,
    node_ids: list[int],
    procs: dict[int, subprocess.Popen[bytes]],
    deadline: float,
) -> None:
    """Until each of ``node_ids`` answers on its own port and is an unfenced broker."""
    waiting = set(node_ids)
    while waiting:
        for node_id, proc in procs.items():
            if proc.poll() is not None:
                log = cluster.node(node_id).log_file
                raise BrokerError(f"node {node_id} exited with code {proc.returncode}; see {log}")
        for node_id in sorted(waiting):
            seen = broker_ids(cluster.node_bootstrap(node_id), timeout=1.0)
            if seen is not None and node_id in seen:
                waiting.discard(node_id)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise BrokerError(
                f"node(s) {sorted(waiting)} not ready in time; see {cluster.run_dir}/node-*/"
            )
        time.sleep(0.3)


def start_cluster(cluster: ClusterLayout, timeout: float = 180.0) -> str:
    """Start every node that does not run; return the bootstrap once all of them are brokers."""
    ensure_jars()
    began = time.monotonic()
    procs: dict[int, subprocess.Popen[bytes]] = {}
    for node_id in cluster.node_ids:
        proc = _launch_node(cluster, node_id)
        if proc is not None:
            procs[node_id] = proc
    try:
        _wait_nodes(cluster, list(cluster.node_ids), procs, began + timeout)
    except BrokerError:
        for node_id in procs:
            kill_node(cluster, node_id)
        raise
    click.echo(
        f"cluster of {cluster.nodes} started at {cluster.bootstrap} in "
        f"{time.monotonic() - began:.1f}s (logs in {cluster.run_dir}/node-*/server.log)"
    )
    return cluster.bootstrap


def start_node(cluster: ClusterLayout, node_id: int, timeout: float = 120.0) -> None:
    """Start one node (again) and wait until the cluster lists it as a broker."""
    began = time.monotonic()
    proc = _launch_node(cluster, node_id)
    _wait_nodes(cluster, [node_id], {node_id: proc} if proc else {}, began + timeout)


def kill_node(cluster: ClusterLayout, node_id: int) -> None:
    """SIGKILL node ``node_id``: no clean shutdown, as in a crash or a lost machine."""
    layout = cluster.node(node_id)
    pid = _read_pid(layout)
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(30)
    layout.pid_file.unlink(missing_ok=True)


def stop_node(cluster: ClusterLayout, node_id: int, timeout: float = 60.0) -> None:
    """SIGTERM node ``node_id`` (a controlled shutdown: its leaderships move first)."""
    _terminate(cluster.node(node_id), timeout)


def stop_cluster(cluster: ClusterLayout, timeout: float = 60.0) -> None:
    # All at once: a node that shuts down alone waits for the others to take its leaderships,
    # which they cannot once the quorum is gone; SIGTERM to all lets each give up in time.
    for node_id in cluster.node_ids:
        pid = _read_pid(cluster.node(node_id))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    for node_id in cluster.node_ids:
        _terminate(cluster.node(node_id), timeout)


def _terminate(layout: BrokerLayout, timeout: float) -> str:
    """SIGTERM the node of ``layout``, SIGKILL it after ``timeout``; what happened, as a line."""
    pid = _read_pid(layout)
    if pid is None:
        layout.pid_file.unlink(missing_ok=True)
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    child = _CHILDREN.pop(pid, None)
    while time.monotonic() < deadline and _read_pid(layout) is not None:
        time.sleep(0.2)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
    layout.pid_file.unlink(missing_ok=True)
    if _read_pid(layout) is not None:
        os.kill(pid, signal.SIGKILL)
        return f"pid {pid} did not stop within {timeout:.0f}s; killed it"
    return f"pid {pid} stopped"


class _Commands(click.Group):
    """Every command's BrokerError (a bad setting, a port, Maven) is one line, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Commands)
def cli() -> None:
    """A single-node Kafka broker for development, tests and the demo (and a cluster)."""


@cli.command("start")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for it.")
def _start_cmd(timeout: float) -> None:
    start(BrokerLayout.from_env(), timeout)


@cli.command("stop")
def _stop_cmd() -> None:
    stop(BrokerLayout.from_env())


@cli.command("status")
def _status_cmd() -> None:
    sys.exit(0 if status(BrokerLayout.from_env()) else 1)


@cli.command("bootstrap")
def _bootstrap_cmd() -> None:
    """Print the bootstrap servers that clients should use."""
    click.echo(current_bootstrap(BrokerLayout.from_env()))


@cli.command("jars")
def _jars_cmd() -> None:
    """Resolve the broker's jars from Maven Central (once)."""
    ensure_jars()


@cli.group("cluster")
def _cluster() -> None:
    """An N-node KRaft cluster (SAGA_KAFKA_CLUSTER_NODES, default 3; SAGA_KAFKA_CLUSTER_PORT,
    default 39192, and the 2N-1 ports after it; data in .run/kafka-cluster)."""


@_cluster.command("start")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for it.")
def _cluster_start(timeout: float) -> None:
    start_cluster(ClusterLayout.from_env(), timeout)


@_cluster.command("stop")
def _cluster_stop() -> None:
    cluster = ClusterLayout.from_env()
    stop_cluster(cluster)
    click.echo(f"cluster in {cluster.run_dir} stopped")


@_cluster.command("status")
def _cluster_status() -> None:
    cluster = ClusterLayout.from_env()
    listed = broker_ids(cluster.bootstrap) or set()
    for node_id in cluster.node_ids:
        pid = node_pid(cluster, node_id)
        state = "broker" if node_id in listed else "not listed"
        click.echo(
            f"node {node_id} {cluster.node_bootstrap(node_id)}: "
            f"{f'pid {pid}' if pid else 'not running'}, {state}"
        )
    sys.exit(0 if len(listed) == cluster.nodes else 1)


@_cluster.command("bootstrap")
def _cluster_bootstrap() -> None:
    click.echo(ClusterLayout.from_env().bootstrap)


@_cluster.command("start-node")
@click.argument("node_id", type=int)
def _cluster_start_node(node_id: int) -> None:
    try:
        start_node(ClusterLayout.from_env(), node_id)
    except ValueError as exc:  # no such node
        raise click.ClickException(str(exc)) from exc


@_cluster.command("stop-node")
@click.argument("node_id", type=int)
def _cluster_stop_node(node_id: int) -> None:
    click.echo(f"node {node_id}: {_terminate(ClusterLayout.from_env().node(node_id), 60.0)}")


@_cluster.command("kill-node")
@click.argument("node_id", type=int)
def _cluster_kill_node(node_id: int) -> None:
    kill_node(ClusterLayout.from_env(), node_id)


if __name__ == "__main__":
    cli()
