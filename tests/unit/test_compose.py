"""docker-compose.yml and Dockerfile, checked statically: no Docker engine, no network.

* `docker compose config -q` validates the file against the Compose specification when a Docker
  client with the compose plugin is installed (skipped otherwise);
* the rest parses the YAML and checks what the Compose schema cannot: that every `playrec`
  subcommand and flag in a `command:` exists in the real CLI parser (and parses), that every
  variable set on a playrec service is one the code reads, and that the services agree with each
  other (volumes, networks, dependencies, Kafka listeners, worker addresses, partitions, app id).

The checks return lists of problems; `test_the_checks_catch_*` feed them broken copies of the file,
so a check that silently stopped checking fails too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from playrec.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SOURCE_DIRS = ("playrec", "stream", "batch", "index")

TOP_LEVEL_KEYS = {"name", "services", "networks", "volumes", "secrets", "configs", "include"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota",
    "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "credential_spec", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname",
    "entrypoint", "env_file", "environment", "expose", "extends", "external_links", "extra_hosts",
    "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links",
    "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit",
    "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform",
    "ports", "post_start", "pre_stop", "privileged", "profiles", "pull_policy", "read_only", "restart",
    "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open", "stop_grace_period",
    "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode", "uts",
    "volumes", "volumes_from", "working_dir",
}  # fmt: skip
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
KAFKA_IMAGE = "apache/kafka:3.9.1"

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$\$")


# -- loading --------------------------------------------------------------------------------------
def interpolate(value):
    """Resolve `${VAR}`, `${VAR:-default}`, `${VAR-default}` to their defaults (never the caller's
    environment, so the checks do not depend on the shell); `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):

        def resolve(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            return m.group("arg") or "" if m.group("op") in (":-", "-") else ""

        return _VAR.sub(resolve, value)
    return value


def load_compose(text: str | None = None) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml")
    doc = yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)  # resolves anchors and `<<`
    return interpolate(doc)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def services(doc: dict) -> dict[str, dict]:
    return {name: svc for name, svc in (doc.get("services") or {}).items() if not name.startswith("x-")}


def is_playrec(svc: dict) -> bool:
    """Built from this repository (runs the `playrec` entry point)."""
    return "build" in svc or str(svc.get("image", "")).split(":")[0].split("/")[-1] == "playrec"


def environment(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def command(svc: dict) -> list[str]:
    cmd = svc.get("command")
    return [str(t) for t in cmd] if isinstance(cmd, list) else []


def option(cmd: list[str], flag: str) -> str | None:
    """The value of `flag` in a command line (`--flag value` or `--flag=value`), else None."""
    for i, token in enumerate(cmd):
        if token == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def mounts(svc: dict) -> list[tuple[str, str, str]]:
    """(kind, source, target) of each volume entry: kind is `volume` (named), `bind` or `anonymous`."""
    out = []
    for entry in svc.get("volumes") or []:
        if isinstance(entry, dict):
            kind = entry.get("type", "volume")
            source, target = str(entry.get("source", "")), str(entry.get("target", ""))
            if kind == "volume" and not source:
                kind = "anonymous"
        else:
            parts = str(entry).split(":")
            if len(parts) == 1:
                out.append(("anonymous", "", parts[0]))
                continue
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith(("/", ".", "~")) or "/" in source else "volume"
        out.append((kind, source, target))
    return out


def depends_on(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def workers(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in services(doc).items() if is_playrec(s) and command(s)[:1] == ["worker"]}


def code_reads(name: str, sources: str) -> bool:
    return f'"{name}"' in sources or f"'{name}'" in sources


def read_sources() -> str:
    return "\n".join(p.read_text() for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py")))


# -- the checks -----------------------------------------------------------------------------------
def check_schema(doc: dict) -> list[str]:
    """A minimal schema: what `docker compose config` would reject, plus dangling references."""
    problems = []
    unknown = {k for k in doc if not k.startswith("x-")} - TOP_LEVEL_KEYS
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)}")
    if "version" in doc:
        problems.append("`version` is obsolete in the Compose specification")
    svcs = services(doc)
    if not svcs:
        return [*problems, "no services"]
    named_volumes = set(doc.get("volumes") or {})
    named_networks = set(doc.get("networks") or {})
    used_volumes: set[str] = set()
    for name, svc in svcs.items():
        where = f"service {name}"
        if not isinstance(svc, dict):
            problems.append(f"{where} is not a mapping")
            continue
        unknown = {k for k in svc if not k.startswith("x-")} - SERVICE_KEYS
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        if "image" not in svc and "build" not in svc:
            problems.append(f"{where} has neither image nor build")
        for key in ("command", "entrypoint"):
            value = svc.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
                problems.append(f"{where}: {key} must be a list of strings (exec form), got {value!r}")
        restart = str(svc.get("restart", "no"))
        if restart.split(":")[0] not in RESTART_POLICIES:
            problems.append(f"{where}: restart {restart!r} is not one of {sorted(RESTART_POLICIES)}")
        for kind, source, target in mounts(svc):
            if not target.startswith("/"):
                problems.append(f"{where}: volume target {target!r} is not an absolute path")
            if kind == "volume":
                used_volumes.add(source)
                if source not in named_volumes:
                    problems.append(f"{where}: volume {source!r} is not declared under top-level volumes")
        nets = svc.get("networks") or []
        for net in nets if isinstance(nets, list) else list(nets):
            if net not in named_networks:
                problems.append(f"{where}: network {net!r} is not declared under top-level networks")
        for dep, condition in depends_on(svc).items():
            if dep not in svcs:
                problems.append(f"{where} depends on {dep!r}, which is not a service")
                continue
            if condition not in DEPENDS_ON_CONDITIONS:
                problems.append(f"{where}: depends_on {dep} condition {condition!r} is not a known condition")
            if condition == "service_healthy" and "healthcheck" not in svcs[dep]:
                problems.append(f"{where} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if "profiles" in svcs[dep] and not set(svcs[dep]["profiles"]) <= set(svc.get("profiles") or []):
                problems.append(f"{where} depends on {dep}, which runs only under profiles {svcs[dep]['profiles']}")
        health = svc.get("healthcheck")
        if health is not None:
            test = health.get("test")
            if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL", "NONE")):
                problems.append(f"{where}: healthcheck test must be a list starting with CMD or CMD-SHELL")
        for port in svc.get("ports") or []:
            spec = str(port.get("host_ip", "") if isinstance(port, dict) else port)
            if not spec.startswith("127.0.0.1"):
                problems.append(f"{where}: port {port!r} is published on every interface, not 127.0.0.1")
    for unused in named_volumes - used_volumes:
        problems.append(f"volume {unused!r} is declared but no service mounts it")
    return problems


def check_cli(doc: dict) -> list[str]:
    """Every playrec command line names a real subcommand and real flags, and the parser accepts it."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    problems = []
    for name, svc in services(doc).items():
        if not is_playrec(svc):
            continue
        cmd = command(svc)
        if not cmd:
            problems.append(f"service {name}: no command (the image's default only prints --help)")
            continue
        sub = subparsers.choices.get(cmd[0])
        if sub is None:
            problems.append(
                f"service {name}: `playrec {cmd[0]}` is not a subcommand (have {sorted(subparsers.choices)})"
            )
            continue
        known = {s for action in sub._actions for s in action.option_strings}
        bad = [t.split("=", 1)[0] for t in cmd[1:] if t.startswith("-") and t.split("=", 1)[0] not in known]
        if bad:
            problems.append(f"service {name}: `playrec {cmd[0]}` has no option {', '.join(bad)}")
            continue
        # exact names above: argparse itself would also accept an abbreviation such as --play
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                sub.parse_args(cmd[1:])
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1:] or ["(no message)"]
            problems.append(f"service {name}: `playrec {' '.join(cmd)}` does not parse: {message[0]}")
    return problems


def check_environment(doc: dict, sources: str) -> list[str]:
    """Every variable set on a playrec service is read by the code (a typo would be silently ignored)."""
    problems = []
    for name, svc in services(doc).items():
        if not is_playrec(svc):
            continue
        for var in environment(svc):
            if not code_reads(var, sources):
                problems.append(f"service {name}: {var} is not read anywhere in {', '.join(SOURCE_DIRS)}")
    return problems


def check_kafka(doc: dict) -> list[str]:
    """A single KRaft node (broker + controller) whose listeners fit together and the clients' addresses."""
    svcs = services(doc)
    kafka = svcs.get("kafka")
    if kafka is None:
        return ["no kafka service"]
    problems = []
    if kafka.get("image") != KAFKA_IMAGE:
        problems.append(f"kafka image is {kafka.get('image')!r}, expected {KAFKA_IMAGE}")
    env = environment(kafka)
    required = {
        "CLUSTER_ID": None,  # the image's start script refuses KRaft mode without it
        "KAFKA_NODE_ID": None,
        "KAFKA_PROCESS_ROLES": None,
        "KAFKA_LISTENERS": None,
        "KAFKA_ADVERTISED_LISTENERS": None,
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": None,
        "KAFKA_CONTROLLER_LISTENER_NAMES": None,
        "KAFKA_CONTROLLER_QUORUM_VOTERS": None,
        "KAFKA_INTER_BROKER_LISTENER_NAME": None,
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    }
    for var, value in required.items():
        if not env.get(var):
            problems.append(f"kafka: {var} is not set")
        elif value is not None and env[var] != value:
            problems.append(f"kafka: {var} is {env[var]}, a single node needs {value}")
    if problems:
        return problems
    if sorted(env["KAFKA_PROCESS_ROLES"].split(",")) != ["broker", "controller"]:
        problems.append("kafka: KAFKA_PROCESS_ROLES must be broker,controller (one node, combined mode)")

    def listeners(value: str) -> dict[str, tuple[str, str]]:
        out = {}
        for item in value.split(","):
            m = re.fullmatch(r"([A-Za-z0-9_]+)://([^:]*):(\d+)", item.strip())
            if not m:
                problems.append(f"kafka: cannot read listener {item!r}")
                continue
            out[m.group(1)] = (m.group(2), m.group(3))
        return out

    bound, advertised = listeners(env["KAFKA_LISTENERS"]), listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    for lname in set(bound) | set(advertised):
        if lname not in protocols:
            problems.append(f"kafka: listener {lname} has no entry in KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")
    for lname, (_, port) in advertised.items():
        if lname not in bound or bound[lname][1] != port:
            problems.append(f"kafka: advertised listener {lname} is not bound on port {port}")
    if controller not in bound:
        problems.append(f"kafka: controller listener {controller} is not in KAFKA_LISTENERS")
    if controller in advertised:
        problems.append("kafka: the controller listener must not be advertised to clients")
    if env["KAFKA_INTER_BROKER_LISTENER_NAME"] not in advertised:
        problems.append("kafka: KAFKA_INTER_BROKER_LISTENER_NAME is not an advertised listener")
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    node = env["KAFKA_NODE_ID"]
    cport = bound.get(controller, ("", ""))[1]
    if voters != [f"{node}@kafka:{cport}"]:
        problems.append(f"kafka: KAFKA_CONTROLLER_QUORUM_VOTERS should be {node}@kafka:{cport}, got {voters}")
    if "healthcheck" not in kafka:
        problems.append("kafka has no healthcheck")
    if not any(kind == "volume" for kind, _, _ in mounts(kafka)):
        problems.append("kafka keeps its log in the container: mount a named volume at KAFKA_LOG_DIRS")
    elif env.get("KAFKA_LOG_DIRS") not in {t for _, _, t in mounts(kafka)}:
        problems.append("kafka: KAFKA_LOG_DIRS is not the mounted volume")

    # every client address used by the playrec services is an advertised listener
    reachable = {f"{host}:{port}" for host, port in advertised.values()}
    for name, svc in services(doc).items():
        if not is_playrec(svc):
            continue
        cmd = command(svc)
        addresses = [environment(svc).get("KAFKA_BOOTSTRAP")]
        addresses += [option(cmd, f) for f in ("--bootstrap", "--from-kafka", "--announce")]
        for address in filter(None, addresses):
            if address.startswith("-"):
                continue  # a bare flag (`retrain --announce` takes no value)
            if address not in reachable:
                problems.append(f"service {name}: Kafka address {address} is not advertised (have {sorted(reachable)})")
        if "kafka" not in depends_on(svc) or depends_on(svc)["kafka"] != "service_healthy":
            problems.append(f"service {name} does not wait for kafka to be healthy")
    partitions = {environment(w).get("PLAYREC_PARTITIONS") for w in workers(doc).values()}
    if env.get("KAFKA_NUM_PARTITIONS") and partitions != {env["KAFKA_NUM_PARTITIONS"]}:
        problems.append(f"kafka: KAFKA_NUM_PARTITIONS {env['KAFKA_NUM_PARTITIONS']} != workers' {partitions}")
    return problems


def check_workers(doc: dict) -> list[str]:
    """Several workers, each reachable by the others at its own --host, sharing one app id and store."""
    ws = workers(doc)
    if len(ws) < 2:
        return [f"{len(ws)} worker service(s); the deployment needs at least 2"]
    problems = []
    envs = {name: environment(w) for name, w in ws.items()}
    for name, w in ws.items():
        env = envs[name]
        host = option(command(w), "--host") or env.get("PLAYREC_HOST")
        port = option(command(w), "--port") or env.get("PLAYREC_PORT") or "6066"
        if host != name:
            problems.append(f"{name}: PLAYREC_HOST/--host is {host!r}; the other workers reach it at {name!r}")
        if w.get("hostname", name) != name:
            problems.append(f"{name}: hostname {w['hostname']!r} differs from the service name")
        if "deploy" in w and (w["deploy"] or {}).get("replicas", 1) != 1:
            problems.append(f"{name}: replicas would share one advertised address")
        health = " ".join(map(str, (w.get("healthcheck") or {}).get("test", [])))
        if "/ready" not in health:
            problems.append(f"{name}: the healthcheck does not ask GET /ready")
        if "127.0.0.1" in health or "localhost" in health:
            problems.append(f"{name}: the worker listens on {host}, not on localhost; check that address")
        ports = [str(p) for p in w.get("ports") or []]
        if ports and ports != [f"127.0.0.1:{port}:{port}"]:
            problems.append(f"{name}: ports {ports}; only 127.0.0.1:{port}:{port} is expected")
        targets = {t: (kind, s) for kind, s, t in mounts(w)}
        store, data_dir = env.get("PLAYREC_STORE"), env.get("PLAYREC_DATA_DIR")
        if targets.get(store, ("",))[0] != "volume":
            problems.append(f"{name}: the model store {store} is not a named volume")
        if targets.get(data_dir, ("",))[0] != "volume":
            problems.append(f"{name}: its state directory {data_dir} is not a named volume")
    published = [n for n, w in ws.items() if w.get("ports")]
    if published != sorted(ws)[:1]:
        problems.append(f"workers publishing a port: {published}; expected only {sorted(ws)[0]}")
    for var in ("PLAYREC_APP_ID", "PLAYREC_PARTITIONS", "PLAYREC_STORE", "KAFKA_BOOTSTRAP", "PLAYREC_TABLE_STORE"):
        values = {env.get(var) for env in envs.values()}
        if len(values) != 1:
            problems.append(f"workers disagree on {var}: {values}")
    stores = {dict((t, s) for _, s, t in mounts(w)).get(envs[n].get("PLAYREC_STORE")) for n, w in ws.items()}
    if len(stores) != 1:
        problems.append(f"workers do not share one model-store volume: {stores}")
    state = [dict((t, s) for _, s, t in mounts(w)).get(envs[n].get("PLAYREC_DATA_DIR")) for n, w in ws.items()]
    if len(set(state)) != len(state):
        problems.append(f"workers share a state volume: {state}")
    return problems


def check_jobs(doc: dict) -> list[str]:
    """`init` trains from a mounted file into the shared store; `retrain` reads the workers' changelog."""
    svcs = services(doc)
    problems = []
    ws = workers(doc)
    worker_env = environment(next(iter(ws.values()))) if ws else {}
    store_volume = dict((t, s) for _, s, t in mounts(next(iter(ws.values())))).get(worker_env.get("PLAYREC_STORE"))
    for job, sub in (("init", "train"), ("retrain", "retrain")):
        svc = svcs.get(job)
        if svc is None:
            problems.append(f"no {job} service")
            continue
        cmd = command(svc)
        if cmd[:1] != [sub]:
            problems.append(f"{job} does not run `playrec {sub}`")
        out = option(cmd, "--out")
        if dict((t, s) for _, s, t in mounts(svc)).get(out) != store_volume:
            problems.append(f"{job}: --out {out} is not the workers' model-store volume {store_volume}")
    init, retrain = svcs.get("init"), svcs.get("retrain")
    if init is not None:
        plays = option(command(init), "--plays") or ""
        if not any(plays.startswith(t.rstrip("/") + "/") for kind, _, t in mounts(init) if kind == "bind"):
            problems.append(f"init: --plays {plays} is not inside a mounted directory")
        if str(init.get("restart", "no")) != "no":
            problems.append("init is a one-off job: restart must be no")
        if not init.get("profiles"):
            problems.append("init has no profile: every `docker compose up` would publish a file-trained model")
    if retrain is not None:
        app_id = option(command(retrain), "--app-id") or "playrec"
        if app_id != worker_env.get("PLAYREC_APP_ID", "playrec"):
            problems.append(f"retrain: --app-id {app_id} is not the workers' {worker_env.get('PLAYREC_APP_ID')}")
        every = option(command(retrain), "--every")
        if every is None:
            problems.append("retrain: no --every (runs once and exits)")
        else:
            from batch.retrain import RetrainError, parse_duration

            try:
                parse_duration(every)
            except RetrainError as exc:
                problems.append(f"retrain: --every {every}: {exc}")
    return problems


def check_monitoring(doc: dict) -> list[str]:
    """Prometheus scrapes every worker's /metrics at its service address, Grafana is provisioned with that
    Prometheus and the playrec dashboard: every bind-mounted file exists in the repository."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the monitoring files")

    def read(path: str) -> str | None:
        full = ROOT / path
        return full.read_text() if full.is_file() else None

    svcs = services(doc)
    problems = []
    for name in ("prometheus", "grafana"):
        if name not in svcs:
            problems.append(f"no {name} service")
    if problems:
        return problems
    binds: dict[str, dict[str, str]] = {}
    for name in ("prometheus", "grafana"):
        binds[name] = {}
        for kind, source, target in mounts(svcs[name]):
            if kind != "bind":
                continue
            relative = source.removeprefix("./")
            binds[name][target] = relative
            if read(relative) is None and not (ROOT / relative).is_dir():
                problems.append(f"{name}: {source} (mounted at {target}) is not in the repository")
    config_path = binds["prometheus"].get("/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(read(config_path) or "{}") if config_path else None
    if not config:
        return [*problems, "prometheus: no /etc/prometheus/prometheus.yml mounted from the repository"]
    ws = workers(doc)
    wanted = {
        f"{name}:{option(command(w), '--port') or environment(w).get('PLAYREC_PORT') or '6066'}"
        for name, w in ws.items()
    }
    jobs = config.get("scrape_configs") or []
    scraped = {
        target
        for job in jobs
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs") or []
        for target in static.get("targets") or []
    }
    if scraped != wanted:
        problems.append(f"prometheus scrapes {sorted(scraped)} at /metrics; the workers are {sorted(wanted)}")
    grafana = binds["grafana"]
    provisioning, dashboards = grafana.get("/etc/grafana/provisioning"), grafana.get("/var/lib/grafana/dashboards")
    if provisioning is None or dashboards is None:
        return [*problems, "grafana: provisioning and dashboards are not both mounted from the repository"]
    sources = yaml.safe_load(read(f"{provisioning}/datasources/prometheus.yml") or "{}") or {}
    prometheus_port = str(svcs["prometheus"].get("ports", ["9090:9090"])[0]).rsplit(":", 1)[1]
    urls = [d.get("url") for d in sources.get("datasources") or [] if d.get("type") == "prometheus"]
    if urls != [f"http://prometheus:{prometheus_port}"]:
        problems.append(f"grafana's Prometheus data source is {urls}, not http://prometheus:{prometheus_port}")
    providers = yaml.safe_load(read(f"{provisioning}/dashboards/playrec.yml") or "{}") or {}
    paths = [(p.get("options") or {}).get("path") for p in providers.get("providers") or []]
    if paths != ["/var/lib/grafana/dashboards"]:
        problems.append(f"grafana loads dashboards from {paths}, not the mounted /var/lib/grafana/dashboards")
    if read(f"{dashboards}/playrec.json") is None:
        problems.append(f"no dashboard {dashboards}/playrec.json")
    return problems


# -- tests on the real files ----------------------------------------------------------------------
def compose_cli() -> list[str] | None:
    """`docker compose` (the v2 plugin) when it runs here, else None."""
    if shutil.which("docker") is None:
        return None
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ["docker", "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker client with the compose plugin here")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--profile", "init", "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_schema(compose):
    assert check_schema(compose) == []


def test_playrec_commands_exist_in_the_cli(compose):
    assert check_cli(compose) == []


def test_environment_variables_are_read_by_the_code(compose):
    assert check_environment(compose, read_sources()) == []


def test_kafka_is_a_single_kraft_node(compose):
    assert check_kafka(compose) == []


def test_workers(compose):
    assert check_workers(compose) == []


def test_init_and_retrain(compose):
    assert check_jobs(compose) == []


def test_monitoring(compose):
    assert check_monitoring(compose) == []


def test_table_store_is_one_faust_knows(compose):
    from faust.stores import by_url

    for name, w in workers(compose).items():
        url = environment(w).get("PLAYREC_TABLE_STORE")
        if url:
            # raises for an unknown scheme; "rocksdict://" would import the rocksdict module, not a store
            assert isinstance(by_url(url), type), f"{name}: {url} is not a faust table store"
            assert url.startswith("rocksdb://"), f"{name}: the image installs rocksdict; use rocksdb://"


def test_dockerfile():
    text = DOCKERFILE.read_text()
    instructions = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    assert any(re.search(r"pip install .*\.\[rocksdb\]", line) for line in instructions)
    users = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert 'ENTRYPOINT ["playrec"]' in instructions
    secrets = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|SASL|_KEY\b|KEYFILE", re.IGNORECASE)
    for line in instructions:
        if line.upper().startswith(("ENV ", "ARG ")):
            assert not secrets.search(line), f"a secret in the image: {line}"
    sources = read_sources()
    for line in instructions:
        if line.upper().startswith("ENV "):
            for var in re.findall(r"\b(PLAYREC_[A-Z_]+|KAFKA_[A-Z_]+)=", line):
                assert code_reads(var, sources), f"Dockerfile sets {var}, which the code does not read"


def test_dockerignore_keeps_the_build_context_small():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore, "ignore everything by default, then list what the image needs"
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert f"!{source}" in ignore or f"!{source}/" in ignore, (
                f"{source} is COPYed but excluded by .dockerignore"
            )


# -- the checks can fail --------------------------------------------------------------------------
def _broken(compose: dict, edit) -> dict:
    doc = copy.deepcopy(compose)
    edit(doc)
    return doc


def _set_command(service: str, cmd: list[str]):
    def edit(doc):
        doc["services"][service]["command"] = cmd

    return edit


def _replace_in_command(service: str, old: str, new: str):
    def edit(doc):
        cmd = doc["services"][service]["command"]
        doc["services"][service]["command"] = [new if t == old else t for t in cmd]

    return edit


def _set_env(service: str, var: str, value: str | None):
    def edit(doc):
        env = doc["services"][service].setdefault("environment", {})
        if value is None:
            env.pop(var, None)
        else:
            env[var] = value

    return edit


BROKEN = {
    "a typo'd flag": (check_cli, _replace_in_command("init", "--plays", "--play")),
    "a typo'd subcommand": (check_cli, _replace_in_command("init", "train", "trian")),
    "a flag of another subcommand": (check_cli, _set_command("worker-1", ["worker", "--plays", "x"])),
    "a missing required flag": (check_cli, _set_command("init", ["train", "--plays", "/data/x"])),
    "a bad flag value": (check_cli, _set_command("init", ["train", "--plays", "/d/x", "--out", "/m", "--keep", "0"])),
    "an unread variable": (
        lambda d: check_environment(d, read_sources()),
        _set_env("worker-1", "PLAYREC_HTTP_PORT", "6066"),
    ),
    "an undeclared volume": (check_schema, lambda d: d["services"]["worker-2"]["volumes"].append("nope:/x")),
    "a dependency on no service": (
        check_schema,
        lambda d: d["services"]["retrain"]["depends_on"].update({"zookeeper": {"condition": "service_started"}}),
    ),
    "a string command": (check_schema, _set_command("worker-2", "worker --port 6066")),
    "a misspelt service key": (check_schema, lambda d: d["services"]["kafka"].update({"healtcheck": {}})),
    "a port on every interface": (check_schema, lambda d: d["services"]["worker-1"].update({"ports": ["6066:6066"]})),
    "a wrong advertised address": (check_kafka, _set_env("worker-2", "KAFKA_BOOTSTRAP", "localhost:9092")),
    "a voter on another port": (check_kafka, _set_env("kafka", "KAFKA_CONTROLLER_QUORUM_VOTERS", "1@kafka:9094")),
    "replication factor 3 on one node": (check_kafka, _set_env("kafka", "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3")),
    "two workers at one address": (check_workers, _set_env("worker-2", "PLAYREC_HOST", "worker-1")),
    "workers in different groups": (check_workers, _set_env("worker-2", "PLAYREC_APP_ID", "other")),
    "a second published worker": (
        check_workers,
        lambda d: d["services"]["worker-2"].update({"ports": ["127.0.0.1:6067:6066"]}),
    ),
    "a retrain period it cannot read": (check_jobs, _replace_in_command("retrain", "6h", "6 hours")),
    "retrain under another app id": (check_jobs, _replace_in_command("retrain", "playrec", "playrec2")),
    "init without a profile": (check_jobs, lambda d: d["services"]["init"].pop("profiles")),
    "a worker Prometheus does not scrape": (
        check_monitoring,
        lambda d: d["services"].update({"worker-3": {**d["services"]["worker-2"], "hostname": "worker-3"}}),
    ),
    "a worker on a port Prometheus does not scrape": (check_monitoring, _set_env("worker-1", "PLAYREC_PORT", "7000")),
    "a monitoring file missing from the repository": (
        check_monitoring,
        lambda d: d["services"]["prometheus"]["volumes"].__setitem__(
            0, "./deploy/nope.yml:/etc/prometheus/prometheus.yml"
        ),
    ),
    "grafana without its dashboards": (
        check_monitoring,
        lambda d: d["services"]["grafana"]["volumes"].pop(1),
    ),
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_the_checks_catch(compose, what):
    check, edit = BROKEN[what]
    before = set(check(compose))  # empty, unless the test of the real file fails too
    assert set(check(_broken(compose, edit))) - before, f"{what} went unnoticed"
