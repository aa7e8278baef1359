"""``Lab``: build, drive and remove the lab; the handle the demo and the end-to-end tests share.

In: a lab name, a policies directory, whether to run the daemon. Out: network namespaces
``<name>-{worker,gw,ext,api-0,etl-0,shell-0}``, servers in the external namespace, the daemon (with
its DNS interceptor) in the gateway namespace, ``/etc/netns/<pod-ns>/resolv.conf`` for each pod
pointing at that interceptor, and
``/run/egressgw-lab/<name>/`` (state, logs, manifests, the PostgreSQL cluster). ``down`` removes
all of it, by recorded state and by name, and is idempotent. Nothing is ever configured in the
root network namespace: links are created from inside a lab namespace with their peer placed
directly in another lab namespace.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from egressgw.lab import netns, services
from egressgw.lab.manifests import DEFAULT_POLICIES_DIR, write_atomically, write_manifests
from egressgw.lab.netns import LabError
from egressgw.lab.probes import Outcome, Verdict, classify_curl, classify_psql
from egressgw.lab.sessions import HttpKeepAlive, PsqlSession
from egressgw.lab.state import LabState, ProcessRecord, state_dir
from egressgw.lab.topology import (
    ANYIP_PREFIX_V6,
    BRIDGE_IFNAME,
    BRIDGE_V4,
    BRIDGE_V6,
    DB_V4,
    DEFAULT_LAB_NAME,
    DNS_BLACKHOLES,
    EXT_IFNAME,
    EXT_V4,
    EXT_V6,
    GATEWAY_NODE_V4,
    GATEWAY_NODE_V6,
    GATEWAY_ROUTE_TO_PODS_V4,
    GATEWAY_ROUTE_TO_PODS_V6,
    POD_PREFIX_V4,
    POD_PREFIX_V6,
    PODS,
    POSTGRES_DATABASE,
    POSTGRES_PORT,
    POSTGRES_USER,
    SERVICE_ADDRESSES,
    SERVICE_IFNAME,
    SERVICE_PREFIX_V4,
    SERVICE_PREFIX_V6,
    STATE_ROOT,
    TRANSIT_GATEWAY_V4,
    TRANSIT_GATEWAY_V6,
    TRANSIT_IFNAME,
    TRANSIT_PREFIX_V4,
    TRANSIT_PREFIX_V6,
    TRANSIT_WORKER_V4,
    TRANSIT_WORKER_V6,
    UPLINK_IFNAME,
    UPLINK_PREFIX_V4,
    UPLINK_PREFIX_V6,
    WEB_V4,
    WEB_V6,
    LabPod,
    NetnsNames,
    check_lab_name,
    pod_by_key,
)

if TYPE_CHECKING:
    # Imported where used: ``python -m egressgw.lab.dnsquery`` must not find itself imported
    # already by this package's __init__.
    from egressgw.lab.dnsquery import DnsResult
    from egressgw.lab.resolveconnect import Report

DAEMON = "daemon"
POSTGRES = "postgres"
HTTPD = "httpd"
DNSMASQ = "dnsmasq"
# Stop order: the daemon first, so it never sees its servers vanish one by one.
PROCESS_ROLES = (DAEMON, HTTPD, DNSMASQ, POSTGRES)
# PostgreSQL's fast shutdown is SIGINT (SIGTERM waits for clients to leave).
STOP_SIGNALS = {POSTGRES: signal.SIGINT}

DAEMON_READY_TIMEOUT_S = 30.0
OBSERVER_TABLE = "egressgw_lab_observe"

# Sysctls per namespace. DAD is off everywhere so IPv6 addresses are usable at once.
_NO_DAD = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}
_FORWARDING = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}

# Pods resolve through the gateway's DNS interceptor, over IPv4 first.
RESOLV_CONF = (
    f"nameserver {TRANSIT_GATEWAY_V4}\nnameserver {TRANSIT_GATEWAY_V6}\n"
    "options timeout:1 attempts:1\n"
)


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
        """Build the whole lab; on any failure remove what was built and raise ``LabError``."""
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
            self._build_network()
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
        services.wait_until(postgres.is_ready, "postgres", self._alive(POSTGRES), postgres.log)
        ready_file = self.statedir / "httpd.ready"
        services.wait_until(
            ready_file.exists, "httpd", self._alive(HTTPD), self.statedir / "httpd.log"
        )
        dns_log = self.statedir / "dnsmasq.log"
        services.wait_until(
            lambda: "started" in _read(dns_log), "dnsmasq", self._alive(DNSMASQ), dns_log
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

    def _build_network(self) -> None:
        n = self.names
        for ns in n.all():
            netns.add(ns)
            self.state.namespaces.append(ns)
            self.state.save()
        for ns in n.all():
            settings = dict(_NO_DAD)
            if ns in (n.worker, n.gateway):
                settings |= _FORWARDING
            netns.sysctl(ns, settings)

        # Veth pairs, each created inside a lab namespace with its peer placed in another one.
        netns.ip_batch(
            n.gateway,
            [
                f"link add {UPLINK_IFNAME} type veth peer name {EXT_IFNAME} netns {n.ext}",
                f"link add {TRANSIT_IFNAME} type veth peer name {TRANSIT_IFNAME} netns {n.worker}",
            ],
        )
        for pod in PODS:
            netns.ip_batch(
                n.pod(pod),
                [f"link add eth0 type veth peer name {pod.worker_ifname} netns {n.worker}"],
            )

        netns.ip_batch(
            n.ext,
            [
                *(
                    f"addr add {a}/{SERVICE_PREFIX_V6} dev {SERVICE_IFNAME} nodad"
                    if ":" in a
                    else f"addr add {a}/{SERVICE_PREFIX_V4} dev {SERVICE_IFNAME}"
                    for a in SERVICE_ADDRESSES
                ),
                # AnyIP: every address of this prefix is local, so each accepts connections.
                f"route add local {ANYIP_PREFIX_V6} dev {SERVICE_IFNAME}",
                f"addr add {EXT_V4}/{UPLINK_PREFIX_V4} dev {EXT_IFNAME}",
                f"addr add {EXT_V6}/{UPLINK_PREFIX_V6} dev {EXT_IFNAME} nodad",
                f"link set {EXT_IFNAME} up",
                # No route back to the pods: traffic that escapes without SNAT gets no reply.
            ],
        )
        netns.ip_batch(
            n.worker,
            [
                f"link add {BRIDGE_IFNAME} type bridge forward_delay 0 stp_state 0",
                f"addr add {BRIDGE_V4}/24 dev {BRIDGE_IFNAME}",
                f"addr add {BRIDGE_V6}/64 dev {BRIDGE_IFNAME} nodad",
                f"link set {BRIDGE_IFNAME} up",
                *(f"link set {pod.worker_ifname} master {BRIDGE_IFNAME} up" for pod in PODS),
                f"addr add {TRANSIT_WORKER_V4}/{TRANSIT_PREFIX_V4} dev {TRANSIT_IFNAME}",
                f"addr add {TRANSIT_WORKER_V6}/{TRANSIT_PREFIX_V6} dev {TRANSIT_IFNAME} nodad",
                f"link set {TRANSIT_IFNAME} up",
            ],
        )
        netns.ip_batch(
            n.gateway,
            [
                f"addr add {TRANSIT_GATEWAY_V4}/{TRANSIT_PREFIX_V4} dev {TRANSIT_IFNAME}",
                f"addr add {TRANSIT_GATEWAY_V6}/{TRANSIT_PREFIX_V6} dev {TRANSIT_IFNAME} nodad",
                f"link set {TRANSIT_IFNAME} up",
                f"addr add {GATEWAY_NODE_V4}/{UPLINK_PREFIX_V4} dev {UPLINK_IFNAME}",
                f"addr add {GATEWAY_NODE_V6}/{UPLINK_PREFIX_V6} dev {UPLINK_IFNAME} nodad",
                f"link set {UPLINK_IFNAME} up",
                f"route add {GATEWAY_ROUTE_TO_PODS_V4} via {TRANSIT_WORKER_V4}",
                f"route add {GATEWAY_ROUTE_TO_PODS_V6} via {TRANSIT_WORKER_V6}",
                f"route add default via {EXT_V4} dev {UPLINK_IFNAME}",
                f"route add default via {EXT_V6} dev {UPLINK_IFNAME}",
            ],
        )
        netns.ip_batch(
            n.worker,
            [
                f"route add default via {TRANSIT_GATEWAY_V4} dev {TRANSIT_IFNAME}",
                f"route add default via {TRANSIT_GATEWAY_V6} dev {TRANSIT_IFNAME}",
            ],
        )
        for pod in PODS:
            netns.ip_batch(
                n.pod(pod),
                [
                    f"addr add {pod.ipv4}/{POD_PREFIX_V4} dev eth0",
                    f"addr add {pod.ipv6}/{POD_PREFIX_V6} dev eth0 nodad",
                    "link set eth0 up",
                    f"route add default via {BRIDGE_V4} dev eth0",
                    f"route add default via {BRIDGE_V6} dev eth0",
                ],
            )
        self._install_observer()

    def _install_observer(self) -> None:
        """Counters in the external namespace for packets that arrive with a pod's own address,
        and the filter that makes the blackhole DNS addresses swallow everything sent to them.

        SNAT replaces every pod address on the way out, so any such packet escaped the gateway:
        ``leaked_packets()`` reads these counters.
        """
        lines = [f"table inet {OBSERVER_TABLE} {{"]
        for pod in PODS:
            for family in ("v4", "v6"):
                lines.append(f"  counter {_leak_counter(pod, family)} {{")
                lines.append("  }")
        lines.append("  chain observe {")
        lines.append("    type filter hook prerouting priority raw; policy accept;")
        for pod in PODS:
            lines.append(f'    ip saddr {pod.ipv4} counter name "{_leak_counter(pod, "v4")}"')
            lines.append(f'    ip6 saddr {pod.ipv6} counter name "{_leak_counter(pod, "v6")}"')
        lines.append("  }")
        lines.append("  chain blackhole {")
        lines.append("    type filter hook input priority filter; policy accept;")
        for address in DNS_BLACKHOLES:
            lines.append(f"    {'ip6' if ':' in address else 'ip'} daddr {address} drop")
        lines.append("  }")
        lines.append("}")
        netns.run(
            netns.exec_argv(self.names.ext, ["nft", "-f", "-"]), input_text="\n".join(lines) + "\n"
        )

    def _write_resolv_conf(self) -> None:
        """Pods resolve names through the gateway's interceptor (``ip netns exec`` bind-mounts
        these over ``/etc/resolv.conf``)."""
        for pod in PODS:
            directory = netns.NETNS_ETC_DIR / self.names.pod(pod)
            self.state.etc_netns_dirs.append(str(directory))
            self.state.save()
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "resolv.conf").write_text(RESOLV_CONF)

    def _start(self, role: str, ns: str, argv: Sequence[str], log: Path) -> ProcessRecord:
        proc, record = services.spawn(ns, argv, log, marker=str(self.statedir))
        self._children[role] = proc
        self.state.processes[role] = record
        self.state.save()
        return record

    # --- the daemon ------------------------------------------------------------------------

    def start_daemon(
        self,
        extra_args: Sequence[str] | None = None,
        ready_timeout_s: float = DAEMON_READY_TIMEOUT_S,
    ) -> float:
        """Run ``egressgw run`` in the gateway namespace; returns seconds until it was ready.

        ``extra_args`` are appended to the command line and remembered for later restarts; None
        reuses the last ones.
        """
        if self.daemon_alive():
            raise LabError("the daemon is already running")
        if extra_args is not None:
            self.state.daemon_args = list(extra_args)
        log = self.daemon_log_path
        with log.open("a") as out:
            out.write(f"--- lab: starting daemon at {time.strftime('%H:%M:%S')} ---\n")
        argv = services.daemon_argv(self.statedir, self.state.daemon_args)
        self._start(DAEMON, self.names.gateway, argv, log)
        return self.wait_daemon_ready(ready_timeout_s)

    def wait_daemon_ready(self, timeout_s: float = DAEMON_READY_TIMEOUT_S) -> float:
        """Seconds until /healthz and /readyz answer; fails early if the daemon exits."""
        return services.wait_until(
            lambda: services.daemon_ready(self.names.gateway),
            "egressgw daemon",
            self._alive(DAEMON),
            self.daemon_log_path,
            timeout_s,
        )

    def _alive(self, role: str) -> Callable[[], bool]:
        def alive() -> bool:
            child = self._children.get(role)
            if child is not None and child.poll() is not None:
                return False
            record = self.state.processes.get(role)
            return record is not None and process_alive(record)

        return alive

    def daemon_alive(self) -> bool:
        record = self.state.processes.get(DAEMON)
        return record is not None and process_alive(record)

    def stop_daemon(self, *, kill9: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the daemon: SIGKILL at once with ``kill9``, else SIGTERM then (bounded) SIGKILL."""
        record = self.state.processes.get(DAEMON)
        if record is None or not process_alive(record):
            return
        if kill9:
            netns.stop_pids([record.pid], timeout_s=0, first_signal=signal.SIGKILL)
        else:
            netns.stop_pids([record.pid], timeout_s=timeout_s)
        child = self._children.pop(DAEMON, None)
        if child is not None:
            child.wait(timeout=5)
        if netns.pid_alive(record.pid):
            raise LabError(f"daemon pid {record.pid} survived SIGKILL")

    def restart_daemon(
        self,
        *,
        kill9: bool = True,
        extra_args: Sequence[str] | None = None,
        ready_timeout_s: float = DAEMON_READY_TIMEOUT_S,
    ) -> float:
        """Stop (by default ``kill -9``) and start the daemon; returns seconds until ready again."""
        self.stop_daemon(kill9=kill9)
        return self.start_daemon(extra_args, ready_timeout_s)

    # --- running things inside the lab ---------------------------------------------------

    def netns_of(self, where: str) -> str:
        """Namespace of a pod (``payments/api-0`` or ``api-0``) or a node (worker, gw, ext)."""
        n = self.names
        nodes = {"worker": n.worker, "gw": n.gateway, "gateway": n.gateway, "ext": n.ext}
        if where in nodes:
            return nodes[where]
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

    def http(self, pod: str, url: str, *, timeout_s: float = 5.0) -> Outcome:
        """GET ``url`` with curl from a pod; the echo server's body names the source it saw."""
        argv = [
            "curl",
            "-v",
            "-sS",
            "-g",
            "--connect-timeout",
            f"{min(3.0, timeout_s):g}",
            "--max-time",
            f"{timeout_s:g}",
            url,
        ]
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
        """Addresses of ``name`` as the pod's resolver returns them (through the gateway)."""
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

        ``server`` defaults to the first nameserver of the pod's resolv.conf: the interceptor.
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

    # --- what the lab saw ---------------------------------------------------------------------

    @property
    def manifests_dir(self) -> Path:
        return self.statedir / "manifests"

    @property
    def daemon_log_path(self) -> Path:
        return self.statedir / "egressgw.log"

    def daemon_log(self, since: int = 0) -> str:
        """The daemon's log (all restarts appended), from byte offset ``since``."""
        try:
            with self.daemon_log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def daemon_log_offset(self) -> int:
        """Where the daemon's log ends now; pass it to ``wait_for_daemon_log`` as ``since``."""
        try:
            return self.daemon_log_path.stat().st_size
        except OSError:
            return 0

    def wait_for_daemon_log(self, text: str, since: int = 0, timeout_s: float = 10.0) -> str:
        """The first line after ``since`` that contains ``text``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.daemon_log(since).splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise LabError(f"daemon did not log {text!r} within {timeout_s:g}s")
            time.sleep(0.05)

    def pg_log(self) -> str:
        return _read(self.statedir / "postgres.log")

    def dns_log(self) -> str:
        return _read(self.statedir / "dnsmasq.log")

    def http_log(self) -> str:
        return _read(self.statedir / "httpd.log")

    def daemon_healthy(self) -> bool:
        """Whether the daemon answers /healthz (its tasks run) right now."""
        return services.daemon_answers(self.names.gateway, "/healthz")

    def daemon_metrics(self) -> dict[str, float]:
        """The daemon's Prometheus samples, keyed ``name{labels}`` as /metrics prints them."""
        samples: dict[str, float] = {}
        for line in services.daemon_get(self.names.gateway, "/metrics").splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            with suppress(ValueError):
                samples[key] = float(value)
        return samples

    def nft_list(self, where: str = "gw") -> str:
        """``nft list ruleset`` of the gateway (or another lab namespace)."""
        return self.exec(where, ["nft", "list", "ruleset"], check=True).stdout

    def leaked_packets(self) -> dict[str, int]:
        """Packets the external network received with a pod's own (un-SNATed) source address.

        Keys are ``<pod-key> v4`` / ``<pod-key> v6``. Any non-zero count means traffic escaped the
        gateway without its egress IP.
        """
        proc = self.exec(
            "ext", ["nft", "-j", "list", "counters", "table", "inet", OBSERVER_TABLE], check=True
        )
        by_name: dict[str, int] = {}
        for item in json.loads(proc.stdout).get("nftables", []):
            counter = item.get("counter")
            if counter:
                by_name[str(counter["name"])] = int(counter["packets"])
        return {
            f"{pod.key} {family}": by_name.get(_leak_counter(pod, family), 0)
            for pod in PODS
            for family in ("v4", "v6")
        }

    def write_manifest(self, filename: str, text: str, *, atomic: bool = True) -> Path:
        """Add or replace a file in the daemon's manifests directory."""
        path = self.manifests_dir / filename
        if atomic:
            write_atomically(path, text)
        else:
            path.write_text(text)
        return path

    def status(self) -> dict[str, Any]:
        """What exists right now: namespaces, processes (alive or not), addresses per namespace."""
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
        raise LabError(f"{exc}; nodes: worker, gw, ext") from exc


def process_alive(record: ProcessRecord) -> bool:
    """Alive and still the process we started (its command line names our state directory)."""
    if not netns.pid_alive(record.pid):
        return False
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return record.marker in cmdline


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
        for role in PROCESS_ROLES:
            record = state.processes.get(role)
            if record is not None and process_alive(record):
                netns.stop_pids(
                    [record.pid], timeout_s=5.0, first_signal=STOP_SIGNALS.get(role, signal.SIGTERM)
                )
                removed.append(f"process {role} (pid {record.pid})")
    recorded = list(state.namespaces) if state is not None else []
    for ns in reversed(list(dict.fromkeys([*names.all(), *recorded]))):
        if ns not in names.all():
            # Only ever remove namespaces whose names this lab owns.
            continue
        if netns.exists(ns):
            netns.delete(ns)
            removed.append(f"netns {ns}")
    etc_dirs = {str(netns.NETNS_ETC_DIR / ns) for ns in names.all()}
    if state is not None:
        etc_dirs |= {d for d in state.etc_netns_dirs if Path(d).parent == netns.NETNS_ETC_DIR}
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


def _leak_counter(pod: LabPod, family: str) -> str:
    return f"leak-{pod.name}-{family}"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


__all__ = ["Lab", "LabError", "Outcome", "Verdict", "down", "is_alive", "lab_up"]
