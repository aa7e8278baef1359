"""The lab's servers and the command lines of its egressgw processes.

In: the lab's state directory and namespace names. Out: command lines, running processes (each
recorded with its pid, namespace, command line and log file) and their readiness. PostgreSQL, the
HTTP echo server and dnsmasq run inside the external namespace; the cluster DNS (a second dnsmasq)
on its own host; an echo server in each unselected pod, for pod-to-pod traffic; ``egressgw agent``
on each worker and ``egressgw run --node-name`` on each gateway node, inside that node's namespace.
Each process is started in a session of its own so it outlives the ``lab up`` command, and every
wait is bounded. Nothing here creates or changes network state.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from egressgw.lab import netns
from egressgw.lab.netns import LabError
from egressgw.lab.state import ProcessRecord
from egressgw.lab.topology import (
    CLUSTER_CIDRS,
    CLUSTER_DNS_TTL_SECONDS,
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    CLUSTER_DOMAIN,
    DAEMON_HTTP_LISTEN,
    DB_V4,
    DB_V6,
    DNS_CNAMES,
    DNS_DOMAIN,
    DNS_HOST_RECORDS,
    DNS_PORT,
    DNS_SHORT_RECORDS,
    DNS_TTL_SECONDS,
    DNS_V4,
    DNS_V6,
    HTTP_PORTS,
    POD_HTTP_PORT,
    POSTGRES_ALLOWED_SOURCES,
    POSTGRES_DATABASE,
    POSTGRES_PORT,
    POSTGRES_USER,
    TEST_PORT,
    UPLINK_IFNAME,
    WEB_ADDRESSES,
    Gateway,
    LabPod,
    Worker,
    addn_hosts_lines,
    cluster_hosts_lines,
)

PG_OS_USER = "postgres"
READY_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.05


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL server binaries (Debian layout), 15 on this platform."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise LabError(
            "PostgreSQL server not found under /usr/lib/postgresql (apt-get install postgresql)"
        )
    return candidates[-1].parent


def as_postgres(argv: Sequence[str]) -> list[str]:
    """Run ``argv`` as the ``postgres`` OS user; setpriv execs in place, so the pid is kept."""
    return ["setpriv", f"--reuid={PG_OS_USER}", f"--regid={PG_OS_USER}", "--init-groups", *argv]


def spawn(
    ns: str, argv: Sequence[str], log: Path, marker: str
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` inside ``ns`` in a new session, stdout and stderr appended to ``log``."""
    full = netns.exec_argv(ns, argv)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return proc, ProcessRecord(pid=proc.pid, netns=ns, argv=full, log=str(log), marker=marker)


def wait_until(
    ready: Callable[[], bool],
    what: str,
    alive: Callable[[], bool] | None,
    log: Path | None,
    timeout_s: float = READY_TIMEOUT_S,
) -> float:
    """Poll ``ready`` until it holds; fail early once ``alive`` says the process is gone.

    Returns the seconds waited.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        if ready():
            return time.monotonic() - start
        if alive is not None and not alive():
            raise LabError(f"{what} exited before it was ready{_tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} not ready after {timeout_s:g}s{_tail(log)}")
        time.sleep(POLL_INTERVAL_S)


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"; last lines of {log}:\n" + "\n".join(text)


# --- PostgreSQL ---------------------------------------------------------------------------


class Postgres:
    """One PostgreSQL cluster in ``<statedir>/pg``, its socket in ``<statedir>/pgsock``."""

    def __init__(self, statedir: Path) -> None:
        self.bin = postgres_bin_dir()
        self.datadir = statedir / "pg"
        # The postgres OS user needs a directory of its own for the socket; the state
        # directory itself stays root-owned.
        self.sockdir = statedir / "pgsock"
        self.log = statedir / "postgres.log"

    def start_initdb(self) -> subprocess.Popen[bytes]:
        """Begin initdb in the background (it needs no network), so it overlaps the netns work."""
        user = pwd.getpwnam(PG_OS_USER)
        for path in (self.datadir, self.sockdir):
            path.mkdir(mode=0o700, exist_ok=False)
            os.chown(path, user.pw_uid, user.pw_gid)
        argv = as_postgres(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                POSTGRES_USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        with self.log.open("ab") as out:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def finish_initdb(self, initdb: subprocess.Popen[bytes]) -> None:
        try:
            code = initdb.wait(timeout=60)
        except subprocess.TimeoutExpired as exc:
            initdb.kill()
            initdb.wait()
            raise LabError("initdb did not finish within 60s") from exc
        if code != 0:
            raise LabError(f"initdb failed with exit {code}{_tail(self.log)}")
        hba = ["# Written by egressgw lab: only the payments project's egress IPs may connect."]
        hba.append("local all all trust")
        hba.extend(f"host all all {source} trust" for source in POSTGRES_ALLOWED_SOURCES)
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def argv(self) -> list[str]:
        return as_postgres(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.datadir),
                "-k",
                str(self.sockdir),
                "-p",
                str(POSTGRES_PORT),
                "-c",
                f"listen_addresses={DB_V4},{DB_V6}",
                "-c",
                "log_connections=on",
                "-c",
                "log_disconnections=on",
                "-c",
                "log_line_prefix=%m [%p] %h ",
                "-c",
                "logging_collector=off",
                # A throwaway cluster in tmpfs: durability buys nothing, start-up speed does.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=16MB",
                "-c",
                "max_connections=30",
            ]
        )

    def is_ready(self) -> bool:
        proc = netns.run(
            [
                str(self.bin / "pg_isready"),
                "-q",
                "-h",
                str(self.sockdir),
                "-p",
                str(POSTGRES_PORT),
                "-t",
                "1",
            ],
            check=False,
            timeout=5,
        )
        return proc.returncode == 0

    def create_database(self) -> None:
        """The ``orders`` database with one table, over the local socket (trusted)."""
        base = [
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.sockdir),
            "-U",
            POSTGRES_USER,
        ]
        netns.run([*base, "-d", "postgres", "-c", f"CREATE DATABASE {POSTGRES_DATABASE}"])
        netns.run(
            [
                *base,
                "-d",
                POSTGRES_DATABASE,
                "-c",
                "CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT now());"
                " INSERT INTO orders (item) VALUES ('lab order 1'), ('lab order 2');",
            ]
        )


# --- HTTP echo servers ------------------------------------------------------------------


def httpd_argv(statedir: Path) -> list[str]:
    """The echo server: every web address on ports 80 and 8080, and every address on the test
    port (IPv4 and IPv6 wildcards, so the AnyIP prefix and the short-TTL name answer too)."""
    argv = [sys.executable, "-m", "egressgw.lab.httpd"]
    for address in WEB_ADDRESSES:
        argv += ["--bind", address]
    for port in HTTP_PORTS:
        argv += ["--port", str(port)]
    argv += ["--listen", f"0.0.0.0:{TEST_PORT}", "--listen", f"[::]:{TEST_PORT}"]
    argv += ["--log", str(statedir / "httpd.log"), "--ready-file", str(statedir / "httpd.ready")]
    return argv


def echo_log(statedir: Path, pod: LabPod) -> Path:
    return statedir / f"echo-{pod.name}.log"


def echo_ready_file(statedir: Path, pod: LabPod) -> Path:
    return statedir / f"echo-{pod.name}.ready"


def pod_echo_argv(statedir: Path, pod: LabPod) -> list[str]:
    """The echo server inside a pod, on every address of the pod: other pods' traffic to it
    reports the source it arrived with."""
    return [
        sys.executable,
        "-m",
        "egressgw.lab.httpd",
        "--listen",
        f"0.0.0.0:{POD_HTTP_PORT}",
        "--listen",
        f"[::]:{POD_HTTP_PORT}",
        "--log",
        str(echo_log(statedir, pod)),
        "--ready-file",
        str(echo_ready_file(statedir, pod)),
    ]


# --- the external DNS server ------------------------------------------------------------


ADDN_HOSTS_FILE = "dnsmasq.hosts"


def write_addn_hosts(statedir: Path) -> Path:
    """The lab DNS server's extra hosts file (race names, the many-address name)."""
    path = statedir / ADDN_HOSTS_FILE
    path.write_text("\n".join(addn_hosts_lines()) + "\n")
    return path


def dnsmasq_argv(statedir: Path) -> list[str]:
    """dnsmasq answering the lab zone only, every query logged (``--log-queries``).

    The hosts file of ``write_addn_hosts`` must exist before it starts.
    """
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    argv = [
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={DNS_V4}",
        f"--listen-address={DNS_V6}",
        f"--port={DNS_PORT}",
        "--log-queries",
        f"--log-facility={statedir / 'dnsmasq.log'}",
        f"--pid-file={statedir / 'dnsmasq.pid'}",
        # Stay root: the log file lives in the root-owned state directory.
        "--user=root",
        # Names under the lab domain that have no record get NXDOMAIN, never a forward.
        f"--local=/{DNS_DOMAIN}/",
        f"--local-ttl={DNS_TTL_SECONDS}",
    ]
    for name, addresses in DNS_HOST_RECORDS:
        argv.append(f"--host-record={name},{','.join(addresses)},{DNS_TTL_SECONDS}")
    for name, addresses, ttl in DNS_SHORT_RECORDS:
        argv.append(f"--host-record={name},{','.join(addresses)},{ttl}")
    for alias, target in DNS_CNAMES:
        argv.append(f"--cname={alias},{target},{DNS_TTL_SECONDS}")
    argv.append(f"--addn-hosts={statedir / ADDN_HOSTS_FILE}")
    return argv


# --- the cluster DNS ----------------------------------------------------------------------


CLUSTER_HOSTS_FILE = "cluster-dns.hosts"


def write_cluster_hosts(statedir: Path) -> Path:
    """The cluster DNS's records (Services and pods under ``cluster.local``)."""
    path = statedir / CLUSTER_HOSTS_FILE
    path.write_text("\n".join(cluster_hosts_lines()) + "\n")
    return path


def cluster_dns_argv(statedir: Path) -> list[str]:
    """dnsmasq as the cluster DNS: ``cluster.local`` from its records (NXDOMAIN for the rest of
    the zone), every other name forwarded to the external DNS, nothing cached (so each query
    it answers shows in its log and at the external DNS), every query logged.

    The hosts file of ``write_cluster_hosts`` must exist before it starts.
    """
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    return [
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={CLUSTER_DNS_V4}",
        f"--listen-address={CLUSTER_DNS_V6}",
        f"--port={DNS_PORT}",
        "--log-queries",
        f"--log-facility={statedir / 'cluster-dns.log'}",
        f"--pid-file={statedir / 'cluster-dns.pid'}",
        "--user=root",
        f"--local=/{CLUSTER_DOMAIN}/",
        f"--local-ttl={CLUSTER_DNS_TTL_SECONDS}",
        f"--addn-hosts={statedir / CLUSTER_HOSTS_FILE}",
        "--cache-size=0",
        "--strict-order",
        f"--server={DNS_V4}",
        f"--server={DNS_V6}",
    ]


# --- egressgw on the nodes ------------------------------------------------------------------


# A gateway answers the DNS its pods send to the cluster DNS (tunnelled to it) and forwards what
# it lets through, and the cluster's own names, to the cluster DNS: over IPv4 first.
DNS_UPSTREAMS: tuple[str, ...] = (
    f"{CLUSTER_DNS_V4}:{DNS_PORT}",
    f"[{CLUSTER_DNS_V6}]:{DNS_PORT}",
)


def dns_listen(gateway: Gateway) -> tuple[str, ...]:
    """Where a gateway's interceptor listens: its node addresses. The DNS the tunnel brings it
    (pods asking the cluster DNS) is answered there too, from the address the pod asked."""
    return (f"{gateway.ipv4}:{DNS_PORT}", f"[{gateway.ipv6}]:{DNS_PORT}")


def _mentions(args: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def gateway_argv(statedir: Path, gateway: Gateway, extra: Sequence[str] = ()) -> list[str]:
    """``egressgw run --node-name`` for a gateway node, with the interceptor on, then ``extra``.

    Flags that take one value are overridden by repeating them in ``extra`` (the last one wins).
    The repeatable ``--upstream`` and ``--dns-listen`` are replaced as a whole: once ``extra``
    names one of them, the lab's defaults for that flag are left out, so a test can put a dead
    upstream first.
    """
    argv = [
        sys.executable,
        "-m",
        "egressgw",
        "run",
        "--manifests",
        str(statedir / "manifests"),
        "--node-name",
        gateway.name,
        "--uplink",
        UPLINK_IFNAME,
        "--http-listen",
        DAEMON_HTTP_LISTEN,
        "--passthrough-domain",
        CLUSTER_DOMAIN,
    ]
    defaults = {"--dns-listen": dns_listen(gateway), "--upstream": DNS_UPSTREAMS}
    for flag, values in defaults.items():
        if not _mentions(extra, flag):
            for value in values:
                argv += [flag, value]
    return [*argv, *extra]


def agent_argv(statedir: Path, worker: Worker, extra: Sequence[str] = ()) -> list[str]:
    """``egressgw agent`` for a worker node: the cluster's networks stay untouched, DNS to the
    cluster DNS addresses is steered with the rest of a selected pod's traffic."""
    argv = [
        sys.executable,
        "-m",
        "egressgw",
        "agent",
        "--manifests",
        str(statedir / "manifests"),
        "--node-name",
        worker.name,
    ]
    for cidr in CLUSTER_CIDRS:
        argv += ["--cluster-cidr", cidr]
    for address in (CLUSTER_DNS_V4, CLUSTER_DNS_V6):
        argv += ["--dns-address", address]
    argv += ["--http-listen", DAEMON_HTTP_LISTEN]
    return [*argv, *extra]


def daemon_answers(ns: str, path: str, timeout_s: float = 1.0) -> bool:
    """Whether the egressgw process of node namespace ``ns`` answers ``path`` with a 2xx."""
    proc = netns.run(
        netns.exec_argv(
            ns,
            [
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                "--max-time",
                f"{timeout_s:g}",
                f"http://{DAEMON_HTTP_LISTEN}{path}",
            ],
        ),
        check=False,
        timeout=timeout_s + 5,
    )
    return proc.returncode == 0


def daemon_get(ns: str, path: str, timeout_s: float = 2.0) -> str:
    """The body of ``path`` from the egressgw process of ``ns`` (``LabError`` on failure)."""
    proc = netns.run(
        netns.exec_argv(
            ns,
            ["curl", "-fsS", "--max-time", f"{timeout_s:g}", f"http://{DAEMON_HTTP_LISTEN}{path}"],
        ),
        timeout=timeout_s + 5,
    )
    return proc.stdout


def daemon_ready(ns: str) -> bool:
    """/healthz (its tasks run) and /readyz (datapath adopted, manifests synced) both answer 2xx."""
    return daemon_answers(ns, "/healthz") and daemon_answers(ns, "/readyz")


def _has_command(*words: str) -> bool:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "egressgw", *words, "--help"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def daemon_available() -> bool:
    """Whether ``python -m egressgw run`` exists in this checkout."""
    return _has_command("run")


def agent_available() -> bool:
    """Whether ``python -m egressgw agent`` exists in this checkout."""
    return _has_command("agent")


def cluster_available() -> str | None:
    """None when both egressgw commands of the lab's nodes exist, else what is missing."""
    missing = [
        f"`python -m egressgw {word}`"
        for word, present in (("run", daemon_available()), ("agent", agent_available()))
        if not present
    ]
    return f"{' and '.join(missing)} not available in this checkout" if missing else None
