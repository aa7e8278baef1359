"""``Lab``: build, drive and remove the lab; the handle the demo and the end-to-end tests share.

In: a lab name, a policies directory, whether to run egressgw. Out: the cluster of ``topology`` in
network namespaces ``<name>-{router,dns,ext,worker-1,worker-2,gateway-1,gateway-2,<pod>...}``
(``network`` wires them); servers in the external namespace (PostgreSQL, the HTTP echo server,
dnsmasq), the cluster DNS on its host, an echo server in each unselected pod; ``egressgw agent`` on
each worker and ``egressgw run --node-name`` on each gateway node; a Kubernetes-style
``/etc/netns/<pod-ns>/resolv.conf`` for each pod (the cluster DNS, search list, ndots:5) and one
naming the external DNS for every other namespace; and ``/run/egressgw-lab/<name>/`` (state, logs,
manifests, the PostgreSQL cluster). ``take_node_down`` kills a node's egressgw and unplugs it;
``bring_node_up`` undoes it. ``down`` removes all of it, by recorded state and by name, and is
idempotent. Nothing is ever configured in the root network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from egressgw.lab import netns, network, services
from egressgw.lab.manifests import DEFAULT_POLICIES_DIR, write_atomically, write_manifests
from egressgw.lab.netns import LabError
from egressgw.lab.probes import Outcome, Verdict, classify_curl, classify_psql
from egressgw.lab.sessions import HttpKeepAlive, PsqlSession
from egressgw.lab.state import LabState, ProcessRecord, state_dir
from egressgw.lab.topology import (
    DB_V4,
    DEFAULT_LAB_NAME,
    DNS_V4,
    DNS_V6,
    ECHO_PODS,
    NODES,
    PAYMENTS_GATEWAY,
    POD_HTTP_PORT,
    PODS,
    POSTGRES_DATABASE,
    POSTGRES_PORT,
    POSTGRES_USER,
    STATE_ROOT,
    UPLINK_IFNAME,
    WEB_V4,
    WEB_V6,
    WORKERS,
    Gateway,
    LabPod,
    NetnsNames,
    check_lab_name,
    node_by_name,
    pod_by_key,
    pod_resolv_conf,
)

if TYPE_CHECKING:
    # Imported where used: ``python -m egressgw.lab.dnsquery`` must not find itself imported
    # already by this package's __init__.
    from egressgw.lab.dnsquery import DnsResult
    from egressgw.lab.resolveconnect import Report

POSTGRES = "postgres"
HTTPD = "httpd"
DNSMASQ = "dnsmasq"
CLUSTER_DNS = "cluster-dns"
# PostgreSQL's fast shutdown is SIGINT (SIGTERM waits for clients to leave).
STOP_SIGNALS = {POSTGRES: signal.SIGINT}

DAEMON_READY_TIMEOUT_S = 30.0
# Nodes and hosts that are no pod resolve through the external DNS (as a node's own resolver).
NODE_RESOLV_CONF = f"nameserver {DNS_V4}\nnameserver {DNS_V6}\noptions timeout:1 attempts:1\n"
# Short names for the places most tests look at.
ALIASES = {"gw": PAYMENTS_GATEWAY, "gateway": PAYMENTS_GATEWAY, "worker": WORKERS[0].name}
NODE_NAMES: tuple[str, ...] = tuple(node.name for node in NODES)


def echo_role(pod: LabPod) -> str:
    return f"echo-{pod.name}"


def egressgw_role(node: str) -> str:
    return f"egressgw-{node}"


def stop_order(roles: Sequence[str]) -> list[str]:
    """egressgw first (so it never sees its servers vanish one by one), PostgreSQL last."""
    first = [role for role in roles if role.startswith("egressgw-")]
    last = [role for role in roles if role == POSTGRES]
    return [*first, *(r for r in roles if r not in first and r not in last), *last]


class Lab:
    """A lab that is up (or being brought up). Use ``Lab.up(...)`` as a context manager."""

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.names = NetnsNames(state.name)
        self.statedir = Path(state.statedir)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        name: str = DEFAULT_LAB_NAME,
        *,
        policies: Path | None = None,
        start_daemon: bool = True,
        daemon_args: Sequence[str] = (),
        root: str = STATE_ROOT,
        daemon_ready_timeout_s: float = DAEMON_READY_TIMEOUT_S,
    ) -> Lab:
        """Build the whole lab; on any failure remove what was built and raise ``LabError``.

        ``start_daemon`` runs egressgw on every node; ``daemon_args`` go to the gateways'
        ``egressgw run``.
        """
        check_lab_name(name)
        if policies is not None and not policies.is_dir():
            raise LabError(f"policies directory {policies} does not exist")
        statedir = state_dir(name, root)
        existing = LabState.load(statedir)
        names = NetnsNames(name)
        if existing is not None or any(netns.exists(ns) for ns in names.all()):
            if is_alive(name, root):
                raise LabError(f"lab {name!r} is already up (egressgw lab down --name {name})")
            # Leftovers of a crashed lab of the same name: clear them first.
            down(name, root=root)
        statedir.mkdir(parents=True, exist_ok=False)
        statedir.chmod(0o755)
        state = LabState(
            name=name,
            statedir=str(statedir),
            policies_dir=str(policies or DEFAULT_POLICIES_DIR),
            started_at=time.time(),
        )
        state.save()
        lab = cls(state)
        try:
            lab._build(start_daemon, daemon_args, daemon_ready_timeout_s)
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def attach(cls, name: str = DEFAULT_LAB_NAME, root: str = STATE_ROOT) -> Lab:
        """The handle of a lab brought up by another process."""
        state = LabState.load(state_dir(check_lab_name(name), root))
        if state is None:
            raise LabError(f"no lab named {name!r} (no state under {state_dir(name, root)})")
        return cls(state)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def down(self) -> None:
        down(self.state.name, root=str(self.statedir.parent))
        for child in self._children.values():
            with suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        self._children.clear()

    # --- building ------------------------------------------------------------------------

    def _build(
        self, start_daemon: bool, daemon_args: Sequence[str], daemon_ready_timeout_s: float
    ) -> None:
        start = time.monotonic()
        postgres = services.Postgres(self.statedir)
        initdb = postgres.start_initdb()
        try:
            network.build(self.names, self._created)
            self._write_resolv_conf()
            self.state.timings_s["network"] = round(time.monotonic() - start, 3)
            postgres.finish_initdb(initdb)
        finally:
            if initdb.poll() is None:
                initdb.kill()
                initdb.wait()
        self._start(POSTGRES, self.names.ext, postgres.argv(), postgres.log)
        self._start(
            HTTPD, self.names.ext, services.httpd_argv(self.statedir), self.statedir / "httpd.log"
        )
        services.write_addn_hosts(self.statedir)
        self._start(
            DNSMASQ,
            self.names.ext,
            services.dnsmasq_argv(self.statedir),
            self.statedir / "dnsmasq.stderr",
        )
        services.write_cluster_hosts(self.statedir)
        self._start(
            CLUSTER_DNS,
            self.names.dns,
            services.cluster_dns_argv(self.statedir),
            self.statedir / "cluster-dns.stderr",
        )
        for pod in ECHO_PODS:
            self._start(
                echo_role(pod),
                self.names.pod(pod),
                services.pod_echo_argv(self.statedir, pod),
                services.echo_log(self.statedir, pod),
            )
        services.wait_until(postgres.is_ready, "postgres", self._alive(POSTGRES), postgres.log)
        ready_file = self.statedir / "httpd.ready"
        services.wait_until(
            ready_file.exists, "httpd", self._alive(HTTPD), self.statedir / "httpd.log"
        )
        for role, log in ((DNSMASQ, "dnsmasq.log"), (CLUSTER_DNS, "cluster-dns.log")):
            path = self.statedir / log
            services.wait_until(partial(_logged, path, "started"), role, self._alive(role), path)
        for pod in ECHO_PODS:
            services.wait_until(
                services.echo_ready_file(self.statedir, pod).exists,
                f"echo server in {pod.key}",
                self._alive(echo_role(pod)),
                services.echo_log(self.statedir, pod),
            )
        postgres.create_database()
        self.state.timings_s["servers"] = round(time.monotonic() - start, 3)
        write_manifests(self.manifests_dir, Path(self.state.policies_dir))
        if start_daemon:
            ready_s = self.start_daemon(daemon_args, ready_timeout_s=daemon_ready_timeout_s)
            self.state.timings_s["daemon_ready"] = round(ready_s, 3)
        self.state.timings_s["total"] = round(time.monotonic() - start, 3)
        self.state.ready = True
        self.state.save()

    def _created(self, ns: str) -> None:
        self.state.namespaces.append(ns)
        self.state.save()

    def _write_resolv_conf(self) -> None:
        """``ip netns exec`` bind-mounts these over ``/etc/resolv.conf``: pods ask the cluster
        DNS the way Kubernetes sets them up, everything else asks the external DNS."""
        texts = {self.names.pod(pod): pod_resolv_conf(pod) for pod in PODS}
        for ns in self.names.all():
            directory = netns.NETNS_ETC_DIR / ns
            self.state.etc_netns_dirs.append(str(directory))
            self.state.save()
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "resolv.conf").write_text(texts.get(ns, NODE_RESOLV_CONF))

    def _start(self, role: str, ns: str, argv: Sequence[str], log: Path) -> ProcessRecord:
        proc, record = services.spawn(ns, argv, log, marker=str(self.statedir))
        self._children[role] = proc
        self.state.processes[role] = record
        self.state.save()
        return record

    def _alive(self, role: str) -> Callable[[], bool]:
        def alive() -> bool:
            child = self._children.get(role)
            if child is not None and child.poll() is not None:
                return False
            record = self.state.processes.get(role)
            return record is not None and process_alive(record)

        return alive

    # --- egressgw on the nodes -------------------------------------------------------------

    def node_name(self, node: str) -> str:
        """The node ``node`` names (a worker or gateway, or an alias: ``gw``, ``worker``)."""
        name = ALIASES.get(node, node)
        if name not in NODE_NAMES:
            raise LabError(f"no node {node!r} in the lab (nodes: {', '.join(NODE_NAMES)})")
        return name

    def _nodes(self, node: str | None) -> list[str]:
        return list(NODE_NAMES) if node is None else [self.node_name(node)]

    def daemon_argv(self, node: str) -> list[str]:
        """The command line of a node's egressgw: ``agent`` on a worker, ``run`` on a gateway
        (with the gateway arguments of the last ``start_daemon``)."""
        spec = node_by_name(self.node_name(node))
        if isinstance(spec, Gateway):
            return services.gateway_argv(self.statedir, spec, self.state.daemon_args)
        return services.agent_argv(self.statedir, spec)

    def start_daemon(
        self,
        extra_args: Sequence[str] | None = None,
        ready_timeout_s: float = DAEMON_READY_TIMEOUT_S,
        *,
        node: str | None = None,
    ) -> float:
        """Start egressgw on ``node``, or on every node that is up and has none running; returns
        seconds until all of them were ready.

        ``extra_args`` go to the gateways' ``egressgw run`` and are remembered for later starts;
        None reuses the last ones.
        """
        nodes = self._nodes(node)
        if node is not None and self.daemon_alive(node):
            raise LabError(f"egressgw is already running on {nodes[0]}")
        if extra_args is not None:
            self.state.daemon_args = list(extra_args)
        start = time.monotonic()
        started = []
        for name in nodes:
            if node is None and (name in self.state.down_nodes or self.daemon_alive(name)):
                continue
            log = self.log_path(name)
            with log.open("a") as out:
                out.write(
                    f"--- lab: starting egressgw on {name} at {time.strftime('%H:%M:%S')} ---\n"
                )
            self._start(egressgw_role(name), self.names.node(name), self.daemon_argv(name), log)
            started.append(name)
        for name in started:
            remaining = max(1.0, ready_timeout_s - (time.monotonic() - start))
            self.wait_daemon_ready(remaining, node=name)
        return time.monotonic() - start

    def wait_daemon_ready(
        self, timeout_s: float = DAEMON_READY_TIMEOUT_S, *, node: str | None = None
    ) -> float:
        """Seconds until /healthz and /readyz answer on ``node`` (default: every node that is
        up); fails early if its egressgw exits."""
        start = time.monotonic()
        for name in self._nodes(node):
            if node is None and name in self.state.down_nodes:
                continue
            ns = self.names.node(name)
            services.wait_until(
                partial(services.daemon_ready, ns),
                f"egressgw on {name}",
                self._alive(egressgw_role(name)),
                self.log_path(name),
                max(1.0, timeout_s - (time.monotonic() - start)),
            )
        return time.monotonic() - start

    def daemon_alive(self, node: str | None = None) -> bool:
        """Whether egressgw runs on ``node`` (default: on every node that is up)."""
        for name in self._nodes(node):
            if node is None and name in self.state.down_nodes:
                continue
            record = self.state.processes.get(egressgw_role(name))
            if record is None or not process_alive(record):
                return False
        return True

    def stop_daemon(
        self, *, kill9: bool = False, node: str | None = None, timeout_s: float = 10.0
    ) -> None:
        """Stop egressgw on ``node`` (default: every node): SIGKILL at once with ``kill9``, else
        SIGTERM then (bounded) SIGKILL. Its kernel state stays."""
        records = []
        for name in self._nodes(node):
            record = self.state.processes.get(egressgw_role(name))
            if record is not None and process_alive(record):
                records.append((name, record))
        netns.stop_pids(
            [record.pid for _name, record in records],
            timeout_s=0 if kill9 else timeout_s,
            first_signal=signal.SIGKILL if kill9 else signal.SIGTERM,
        )
        for name, record in records:
            child = self._children.pop(egressgw_role(name), None)
            if child is not None:
                child.wait(timeout=5)
            if netns.pid_alive(record.pid):
                raise LabError(f"egressgw on {name} (pid {record.pid}) survived SIGKILL")

    def restart_daemon(
        self,
        *,
        kill9: bool = True,
        node: str | None = None,
        extra_args: Sequence[str] | None = None,
        ready_timeout_s: float = DAEMON_READY_TIMEOUT_S,
    ) -> float:
        """Stop (by default ``kill -9``) and start egressgw on ``node`` (default: every node);
        returns seconds until ready again."""
        self.stop_daemon(kill9=kill9, node=node)
        return self.start_daemon(extra_args, ready_timeout_s, node=node)

    def take_node_down(self, node: str) -> None:
        """A node fails: its egressgw is killed (``kill -9``) and the node drops off its
        switches. Its kernel state stays, as on a node that lost power and comes back."""
        name = self.node_name(node)
        self.stop_daemon(kill9=True, node=name)
        network.unplug(self.names, name)
        if name not in self.state.down_nodes:
            self.state.down_nodes.append(name)
            self.state.save()

    def bring_node_up(self, node: str, ready_timeout_s: float = DAEMON_READY_TIMEOUT_S) -> float:
        """Undo ``take_node_down``: plug the node back and start its egressgw again if the lab
        ran one there; returns seconds until it was ready (0 without egressgw)."""
        name = self.node_name(node)
        network.plug(self.names, name)
        if name in self.state.down_nodes:
            self.state.down_nodes.remove(name)
            self.state.save()
        if egressgw_role(name) in self.state.processes and not self.daemon_alive(name):
            return self.start_daemon(None, ready_timeout_s, node=name)
        return 0.0

    def node_is_down(self, node: str) -> bool:
        return network.unplugged(self.names, self.node_name(node))

    # --- running things inside the lab ---------------------------------------------------

    def netns_of(self, where: str) -> str:
        """Namespace of a pod (``payments/api-0`` or ``api-0``), a node (``worker-1``, ...,
        ``gateway-2``; ``gw`` and ``worker`` are ``gateway-1`` and ``worker-1``), or ``switch``,
        ``router``, ``dns``, ``ext``."""
        n = self.names
        fixed = {"switch": n.switch, "router": n.router, "dns": n.dns, "ext": n.ext}
        name = ALIASES.get(where, where)
        if name in fixed:
            return fixed[name]
        if name in NODE_NAMES:
            return n.node(name)
        return n.pod(pod_of(where))

    def exec(
        self,
        where: str,
        argv: Sequence[str],
        timeout: float = 10.0,
        *,
        check: bool = False,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside a pod or node, bounded by ``timeout`` seconds."""
        return netns.run(
            netns.exec_argv(self.netns_of(where), argv),
            timeout=timeout,
            check=check,
            input_text=input_text,
        )

    def spawn(self, where: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """Start a long-lived process inside a pod or node (text pipes); the caller stops it."""
        popen.setdefault("text", True)
        return subprocess.Popen(netns.exec_argv(self.netns_of(where), argv), **popen)

    def psql(
        self,
        pod: str,
        host: str = DB_V4,
        sql: str = "select inet_client_addr()",
        *,
        user: str = POSTGRES_USER,
        dbname: str = POSTGRES_DATABASE,
        connect_timeout_s: int = 3,
    ) -> Outcome:
        """Run one query with ``psql`` from a pod; the outcome carries the source the server saw
        (with the default query) and psql's rows in ``output``."""
        conninfo = (
            f"host={host} port={POSTGRES_PORT} user={user} dbname={dbname}"
            f" connect_timeout={connect_timeout_s} sslmode=disable gssencmode=disable"
        )
        argv = ["psql", "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql]
        start = time.monotonic()
        try:
            proc: subprocess.CompletedProcess[str] | None = self.exec(
                pod, argv, timeout=connect_timeout_s + 7
            )
        except LabError:
            proc = None
        return classify_psql(proc, time.monotonic() - start)

    def http(
        self, pod: str, url: str, *, timeout_s: float = 5.0, interface: str | None = None
    ) -> Outcome:
        """GET ``url`` with curl from a pod; the echo server's body names the source it saw.
        ``interface`` is the source address to send from (curl's ``--interface``)."""
        argv = [
            "curl",
            "-v",
            "-sS",
            "-g",
            "--connect-timeout",
            f"{min(3.0, timeout_s):g}",
            "--max-time",
            f"{timeout_s:g}",
        ]
        if interface is not None:
            argv += ["--interface", interface]
        argv.append(url)
        start = time.monotonic()
        try:
            proc: subprocess.CompletedProcess[str] | None = self.exec(
                pod, argv, timeout=timeout_s + 5
            )
        except LabError:
            proc = None
        return classify_curl(proc, time.monotonic() - start)

    def psql_session(
        self, pod: str, host: str = DB_V4, *, connect_timeout_s: int = 3
    ) -> PsqlSession:
        """An open psql session from a pod, fed queries over stdin (see ``PsqlSession``)."""
        conninfo = (
            f"host={host} port={POSTGRES_PORT} user={POSTGRES_USER} dbname={POSTGRES_DATABASE}"
            f" connect_timeout={connect_timeout_s} sslmode=disable gssencmode=disable"
        )
        argv = ["psql", "-X", "-w", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", conninfo]
        return PsqlSession(self._pipe(pod, argv))

    def http_keepalive(
        self, pod: str, family: int = 4, port: int = 80, *, host: str | None = None
    ) -> HttpKeepAlive:
        """One TCP connection from a pod to the echo server (``host``, default the web server's
        address of ``family``), asked again on demand. It connects to the address as given: resolve
        the name first where the policy allows it by name only."""
        if host is None:
            host = WEB_V4 if family == 4 else WEB_V6
        argv = [sys.executable, "-m", "egressgw.lab.keepalive", host, str(port)]
        return HttpKeepAlive(self._pipe(pod, argv))

    def _pipe(self, pod: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        return self.spawn(
            pod,
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def resolve(self, pod: str, name: str, family: int, timeout_s: float = 5.0) -> list[str]:
        """Addresses of ``name`` as the pod's resolver returns them: its resolv.conf, search
        list and ndots included (``getent``)."""
        database = "ahostsv4" if family == 4 else "ahostsv6"
        try:
            proc = self.exec(pod, ["getent", database, name], timeout=timeout_s)
        except LabError:
            return []
        found: list[str] = []
        for line in proc.stdout.splitlines():
            address = line.split()[0] if line.split() else ""
            if address and not address.startswith("::ffff:") and address not in found:
                found.append(address)
        return found

    def dns_query(
        self,
        where: str,
        name: str,
        qtype: str = "A",
        *,
        server: str | None = None,
        tcp: bool = False,
        edns: int | None = None,
        timeout_s: float = 3.0,
    ) -> DnsResult:
        """One DNS query from a pod or node, with the exact response code (see ``dnsquery``).

        ``name`` is asked as given (no search list). ``server`` defaults to the first nameserver
        of the pod's resolv.conf: the cluster DNS, whose address a selected pod's gateway answers
        from.
        """
        argv = [sys.executable, "-m", "egressgw.lab.dnsquery", name, qtype]
        argv += ["--timeout-s", f"{timeout_s:g}"]
        if server is not None:
            argv += ["--server", server]
        if tcp:
            argv.append("--tcp")
        if edns is not None:
            argv += ["--edns", str(edns)]
        from egressgw.lab.dnsquery import DnsResult

        proc = self.exec(where, argv, timeout=timeout_s + 10, check=True)
        return DnsResult.from_json(proc.stdout.strip().splitlines()[-1])

    def resolve_connect(
        self,
        pod: str,
        name_format: str,
        count: int,
        port: int,
        *,
        first: int = 0,
        family: int = 6,
        budget_s: float = 60.0,
        step_timeout_s: float = 3.0,
        expect_source: str | None = None,
    ) -> Report:
        """Resolve ``count`` names and connect to each at once, from one process in the pod.

        See ``egressgw.lab.resolveconnect``; bounded by ``count`` and by ``budget_s``.
        """
        argv = [
            sys.executable,
            "-m",
            "egressgw.lab.resolveconnect",
            "--format",
            name_format,
            "--first",
            str(first),
            "--count",
            str(count),
            "--port",
            str(port),
            "--family",
            str(family),
            "--budget-s",
            f"{budget_s:g}",
            "--step-timeout-s",
            f"{step_timeout_s:g}",
        ]
        if expect_source is not None:
            argv += ["--expect-source", expect_source]
        from egressgw.lab.resolveconnect import Report

        proc = self.exec(pod, argv, timeout=budget_s + 4 * step_timeout_s + 30)
        lines = proc.stdout.strip().splitlines()
        if not lines:
            problem = f"resolveconnect printed nothing (exit {proc.returncode}): {proc.stderr}"
            raise LabError(problem)
        return Report.from_json(lines[-1])

    def web_url(self, family: int, port: int, path: str = "/") -> str:
        return url(WEB_V4 if family == 4 else WEB_V6, port, path)

    def pod_url(self, pod: str, family: int, path: str = "/") -> str:
        """The echo server of an unselected pod, by its address."""
        return url(pod_of(pod).address(family), POD_HTTP_PORT, path)

    # --- what the lab saw ---------------------------------------------------------------------

    @property
    def manifests_dir(self) -> Path:
        return self.statedir / "manifests"

    def log_path(self, node: str = PAYMENTS_GATEWAY) -> Path:
        """The log of a node's egressgw (all restarts appended)."""
        return self.statedir / f"egressgw-{self.node_name(node)}.log"

    @property
    def daemon_log_path(self) -> Path:
        """The log of the payments gateway's egressgw."""
        return self.log_path(PAYMENTS_GATEWAY)

    def daemon_log(self, since: int = 0, *, node: str = PAYMENTS_GATEWAY) -> str:
        """A node's egressgw log (default: the payments gateway's), from byte offset ``since``."""
        try:
            with self.log_path(node).open("rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def daemon_log_offset(self, *, node: str = PAYMENTS_GATEWAY) -> int:
        """Where a node's egressgw log ends now; pass it to ``wait_for_daemon_log``."""
        try:
            return self.log_path(node).stat().st_size
        except OSError:
            return 0

    def wait_for_daemon_log(
        self, text: str, since: int = 0, timeout_s: float = 10.0, *, node: str = PAYMENTS_GATEWAY
    ) -> str:
        """The first line after ``since`` that contains ``text``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.daemon_log(since, node=node).splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise LabError(
                    f"egressgw on {self.node_name(node)} did not log {text!r} within {timeout_s:g}s"
                )
            time.sleep(0.05)

    def pg_log(self) -> str:
        return _read(self.statedir / "postgres.log")

    def dns_log(self) -> str:
        """The external DNS server's query log."""
        return _read(self.statedir / "dnsmasq.log")

    def cluster_dns_log(self) -> str:
        """The cluster DNS's query log (``query[A] NAME from ADDRESS`` per query)."""
        return _read(self.statedir / "cluster-dns.log")

    def http_log(self) -> str:
        """The external echo server's log (``source=ADDRESS`` per request)."""
        return _read(self.statedir / "httpd.log")

    def echo_log(self, pod: str) -> str:
        """The log of the echo server inside an unselected pod."""
        return _read(services.echo_log(self.statedir, pod_of(pod)))

    def daemon_healthy(self, node: str = PAYMENTS_GATEWAY) -> bool:
        """Whether a node's egressgw answers /healthz (its tasks run) right now."""
        return services.daemon_answers(self.netns_of(node), "/healthz")

    def daemon_metrics(self, node: str = PAYMENTS_GATEWAY) -> dict[str, float]:
        """A node's egressgw Prometheus samples, keyed ``name{labels}`` as /metrics prints them."""
        samples: dict[str, float] = {}
        for line in services.daemon_get(self.netns_of(node), "/metrics").splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            with suppress(ValueError):
                samples[key] = float(value)
        return samples

    def nft_list(self, where: str = "gw") -> str:
        """``nft list ruleset`` of a node (default: the payments gateway) or another namespace."""
        return self.exec(where, ["nft", "list", "ruleset"], check=True).stdout

    def leaked_packets(self) -> dict[str, int]:
        """Packets the external network received with a pod's own (untranslated) source address.

        Keys are ``<pod-key> v4`` / ``<pod-key> v6``. Any non-zero count means traffic escaped
        without the egress IP or the router's address.
        """
        counters = network.read_counters(self.names.ext, network.OBSERVER_TABLE)
        return {
            f"{pod.key} v{family}": counters.get(network.leak_counter(pod, family), 0)
            for pod in PODS
            for family in (4, 6)
        }

    def routed_packets(self) -> dict[str, int]:
        """Packets of each pod that the node router masqueraded to its own address.

        Keys as ``leaked_packets``. That is the normal path of an unselected pod; a selected pod
        counted here left without its gateway.
        """
        counters = network.read_counters(self.names.router, network.ROUTER_TABLE)
        return {
            f"{pod.key} v{family}": counters.get(network.routed_counter(pod, family), 0)
            for pod in PODS
            for family in (4, 6)
        }

    @contextmanager
    def counting(
        self, where: str, *matches: str, then: str = ""
    ) -> Iterator[Callable[[], list[int]]]:
        """Count the packets that arrive in a namespace (``ext``, ``router``, a node) matching
        each nftables expression, e.g. ``ip saddr 198.51.100.10 tcp dport 5432``, until the block
        ends; yields a function that reads the counts in the order of ``matches``. ``then``
        (``drop``) stops the packets counted."""
        table = f"egressgw_lab_count_{uuid.uuid4().hex[:8]}"
        with network.counting(self.netns_of(where), matches, table, then) as read:
            yield read

    def egress_ips(self, node: str) -> list[str]:
        """Addresses on a gateway's uplink besides its own: the egress IPs it holds now."""
        spec = node_by_name(self.node_name(node))
        own = {spec.uplink_v4, spec.uplink_v6} if isinstance(spec, Gateway) else set()
        proc = self.exec(node, ["ip", "-j", "addr", "show", "dev", UPLINK_IFNAME], check=True)
        found = []
        for link in json.loads(proc.stdout or "[]"):
            for info in link.get("addr_info", []):
                address = str(info.get("local", ""))
                if (
                    address
                    and address not in own
                    and not ipaddress.ip_address(address).is_link_local
                ):
                    found.append(address)
        return found

    def write_manifest(self, filename: str, text: str, *, atomic: bool = True) -> Path:
        """Add or replace a file in the manifests directory every egressgw of the lab reads."""
        path = self.manifests_dir / filename
        if atomic:
            write_atomically(path, text)
        else:
            path.write_text(text)
        return path

    def status(self) -> dict[str, Any]:
        """What exists right now: namespaces, processes (alive or not), addresses per namespace,
        nodes that are down."""
        namespaces = {ns: netns.exists(ns) for ns in self.names.all()}
        processes = {
            role: {"pid": record.pid, "alive": process_alive(record), "log": record.log}
            for role, record in self.state.processes.items()
        }
        addresses: dict[str, list[str]] = {}
        for ns, present in namespaces.items():
            if not present:
                continue
            proc = netns.run(["ip", "-n", ns, "-br", "addr", "show"], check=False)
            addresses[ns] = [line for line in proc.stdout.splitlines() if line.strip()]
        return {
            "name": self.state.name,
            "statedir": str(self.statedir),
            "ready": self.state.ready,
            "timings_s": dict(self.state.timings_s),
            "namespaces": namespaces,
            "processes": processes,
            "addresses": addresses,
            "down_nodes": list(self.state.down_nodes),
        }


# --- module-level helpers (usable without a Lab handle) --------------------------------------


def url(address: str, port: int, path: str = "/") -> str:
    """``http://ADDR:PORT/path``, the address in brackets when it is IPv6."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


def pod_of(where: str) -> LabPod:
    try:
        return pod_by_key(where)
    except ValueError as exc:
        raise LabError(
            f"{exc}; nodes: {', '.join(NODE_NAMES)} (gw, worker), router, dns, ext"
        ) from exc


EXEC_READS = 5  # reads of a command line that is empty while its process execs
EXEC_READ_PAUSE_S = 0.01


def process_alive(record: ProcessRecord) -> bool:
    """Alive and still the process we started (its command line names our state directory).

    A process in the middle of an exec shows an empty command line for a moment (``egressgw
    run --dns-listen`` starts over once, on its allocator): it is read again."""
    for _ in range(EXEC_READS):
        if not netns.pid_alive(record.pid):
            return False
        try:
            cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        if cmdline:
            return record.marker in cmdline.decode()
        time.sleep(EXEC_READ_PAUSE_S)
    return False


def is_alive(name: str, root: str = STATE_ROOT) -> bool:
    """Whether a lab of that name is up: state recorded and every namespace present."""
    state = LabState.load(state_dir(name, root))
    if state is None:
        return False
    return all(netns.exists(ns) for ns in NetnsNames(name).all())


def down(name: str = DEFAULT_LAB_NAME, *, root: str = STATE_ROOT) -> list[str]:
    """Remove a lab: its processes, namespaces, ``/etc/netns`` files and state directory.

    Works from the recorded state and, for whatever the record misses (a crash during ``up``, a
    lost state file), from the lab's namespace names. Idempotent. Returns what was removed.
    """
    check_lab_name(name)
    statedir = state_dir(name, root)
    state = LabState.load(statedir)
    names = NetnsNames(name)
    removed: list[str] = []
    if state is not None:
        for role in stop_order(list(state.processes)):
            record = state.processes[role]
            if process_alive(record):
                netns.stop_pids(
                    [record.pid], timeout_s=5.0, first_signal=STOP_SIGNALS.get(role, signal.SIGTERM)
                )
                removed.append(f"process {role} (pid {record.pid})")
    # Only ever remove namespaces whose names this lab owns: its own, and recorded ones with its
    # prefix (a lab built by another version of the lab).
    recorded = [ns for ns in (state.namespaces if state else []) if names.owns(ns)]
    for ns in reversed(list(dict.fromkeys([*names.all(), *recorded]))):
        if netns.exists(ns):
            netns.delete(ns)
            removed.append(f"netns {ns}")
    etc_dirs = {str(netns.NETNS_ETC_DIR / ns) for ns in names.all()}
    if state is not None:
        etc_dirs |= {
            d
            for d in state.etc_netns_dirs
            if Path(d).parent == netns.NETNS_ETC_DIR and names.owns(Path(d).name)
        }
    for directory in sorted(etc_dirs):
        if Path(directory).exists():
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    if statedir.exists():
        shutil.rmtree(statedir, ignore_errors=True)
        removed.append(str(statedir))
    # The parents go too once no lab uses them (rmdir refuses while another lab has files there).
    for parent in (statedir.parent, netns.NETNS_ETC_DIR):
        with suppress(OSError):
            parent.rmdir()
    return removed


@contextmanager
def lab_up(name: str = DEFAULT_LAB_NAME, **kwargs: Any) -> Iterator[Lab]:
    """``with lab_up(name) as lab:`` — the lab is removed on exit, also on failure."""
    lab = Lab.up(name, **kwargs)
    try:
        yield lab
    finally:
        lab.down()


def _logged(path: Path, text: str) -> bool:
    return text in _read(path)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


__all__ = ["Lab", "LabError", "Outcome", "Verdict", "down", "is_alive", "lab_up"]
