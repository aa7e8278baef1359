"""``egressgw lab up|demo|status|node-down|node-up|down``: the lab from the command line.

In: parsed arguments. Out: text on stdout/stderr and an exit code (0 success, 1 a demo row did not
match or a step failed, 2 the lab cannot run here). ``add_lab_parser`` hangs these commands under
the main ``egressgw`` parser; ``python -m egressgw.lab`` runs them on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from egressgw.lab import demo, services
from egressgw.lab.lab import Lab, down, is_alive
from egressgw.lab.netns import LabError
from egressgw.lab.state import state_dir
from egressgw.lab.topology import (
    CLUSTER_DNS_V4,
    CLUSTER_DNS_V6,
    DAEMON_HTTP_LISTEN,
    DEFAULT_LAB_NAME,
    GATEWAYS,
    NODES,
    ROUTER_V4,
    WORKERS,
    NetnsNames,
    gateway_of,
    pod_by_key,
    pods_on,
)


def add_lab_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    lab = subparsers.add_parser(
        "lab",
        help="a small cluster in network namespaces: workers with pods, gateway nodes, a node "
        "router, a cluster DNS, an external network",
        description=__doc__,
    )
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    def with_name(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--name",
            default=DEFAULT_LAB_NAME,
            help="lab name, the prefix of its network namespaces (default: %(default)s)",
        )
        return parser

    policies_help = "directory of policy YAML files to load (default: the examples in policies/)"
    up = with_name(
        sub.add_parser(
            "up",
            help="build the lab and start egressgw on its nodes",
            description="Build the lab, start `egressgw agent` on the workers and `egressgw run` "
            "on the gateway nodes, and print commands to try. Exit status: 0 up, 1 a step "
            "failed, 2 the lab cannot run here.",
        )
    )
    up.add_argument("--policies", type=Path, metavar="DIR", help=policies_help)
    up.add_argument(
        "--no-daemon",
        action="store_true",
        help="build the network and servers only (every pod leaves through the node router)",
    )
    up.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the gateway nodes' `egressgw run`; repeatable",
    )
    up.set_defaults(func=lab_up)

    run_demo = with_name(
        sub.add_parser(
            "demo",
            help="bring the lab up, probe every pod, fail a gateway node, report",
            description="Bring the lab up (or use the one that is up), probe every pod, print "
            "a table of what happened; then take the gateway node that holds payments' egress "
            "IPs down and probe again. Exit status: 0 every row as expected, 1 a row did not "
            "match or a step failed, 2 the lab cannot run here.",
        )
    )
    run_demo.add_argument("--policies", type=Path, metavar="DIR", help=policies_help)
    run_demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the lab up afterwards and print commands to try (default: tear it down)",
    )
    run_demo.set_defaults(func=lab_demo)

    status = with_name(sub.add_parser("status", help="namespaces, processes and addresses"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=lab_status)

    node_names = [node.name for node in NODES]
    node_down = with_name(
        sub.add_parser(
            "node-down",
            help="fail a node: kill its egressgw, unplug it from its networks",
            description="Fail a node of a lab that is up: its egressgw is killed (kill -9) and "
            "the node is unplugged from the node network (and a gateway from the external "
            "network); its kernel state stays. Exit status: 0 done, 1 it failed.",
        )
    )
    node_down.add_argument(
        "node", choices=node_names, help=f"the node to fail: {', '.join(node_names)}"
    )
    node_down.set_defaults(func=lab_node_down)
    node_up = with_name(
        sub.add_parser(
            "node-up",
            help="undo node-down: plug the node back, start its egressgw",
            description="Plug a node back in and start its egressgw again (if the lab runs "
            "egressgw). Exit status: 0 ready, 1 it failed.",
        )
    )
    node_up.add_argument(
        "node", choices=node_names, help=f"the node to bring back: {', '.join(node_names)}"
    )
    node_up.set_defaults(func=lab_node_up)

    tear = with_name(sub.add_parser("down", help="stop the lab's processes, delete its namespaces"))
    tear.set_defaults(func=lab_down)


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables, PostgreSQL as its own user)"
    return None


def _sigterm_as_interrupt() -> None:
    """Turn SIGTERM into KeyboardInterrupt so every ``finally`` that tears down still runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def lab_up(args: argparse.Namespace) -> int:
    problem = _preflight()
    if problem:
        print(f"egressgw lab up: {problem}", file=sys.stderr)
        return 2
    _sigterm_as_interrupt()
    start = time.monotonic()
    try:
        lab = Lab.up(
            args.name,
            policies=args.policies,
            start_daemon=not args.no_daemon,
            daemon_args=args.daemon_arg,
        )
    except (LabError, ValueError) as exc:
        print(f"egressgw lab up: {exc}", file=sys.stderr)
        return 1
    print(f"lab {args.name!r} is up after {time.monotonic() - start:.1f}s; state in {lab.statedir}")
    print(usage(lab.state.name, lab.statedir, daemon=not args.no_daemon))
    return 0


def egressgw_command() -> str:
    """How a shell here runs egressgw: by name when it is on PATH, else by its path."""
    if shutil.which("egressgw"):
        return "egressgw"
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started is not None and started.name == "egressgw" and started.exists():
        return shlex.quote(str(started.absolute()))
    return f"{shlex.quote(sys.executable)} -m egressgw"


def usage(name: str, statedir: Path | None = None, *, daemon: bool = True) -> str:
    """What to try in the lab named ``name``: commands that run as printed, as root."""
    n = NetnsNames(name)
    manifests = (statedir or state_dir(name)) / "manifests"
    api_0, api_1 = pod_by_key("payments/api-0"), pod_by_key("payments/api-1")
    etl_1, shell_0 = pod_by_key("analytics/etl-1"), pod_by_key("sandbox/shell-0")
    payments_gw, analytics_gw = gateway_of("payments"), gateway_of("analytics")
    egressgw = egressgw_command()
    url = f"http://{DAEMON_HTTP_LISTEN}"
    in_payments_gw = f"ip netns exec {n.node(payments_gw.name)}"
    in_analytics_gw = f"ip netns exec {n.node(analytics_gw.name)}"
    lines = [
        "namespaces: " + " ".join(n.all()),
        *(
            f"node: {w.name} ({n.node(w.name)}): pods "
            + " ".join(f"{p.key} ({n.pod(p)})" for p in pods_on(w.name))
            for w in WORKERS
        ),
        *(f"node: {g.name} ({n.node(g.name)}): holds {g.project}' egress IPs" for g in GATEWAYS),
        f"try:  ip netns exec {n.pod(api_0)} psql -h db.lab.example -U postgres orders"
        ' -c "select inet_client_addr()"',
        f"      ip netns exec {n.pod(api_1)} curl -s http://web.lab.example/",
        f"      ip netns exec {n.pod(api_0)} getent hosts blocked.lab.example"
        "   # NXDOMAIN: exit status 2",
        f"      ip netns exec {n.pod(etl_1)} getent hosts shell-0.shell.sandbox"
        "   # a cluster.local name, through the search list",
        f"      ip netns exec {n.pod(shell_0)} curl -s http://web.lab.example/"
        f"   # not selected: leaves as the node router, {ROUTER_V4}",
        f"ask:  {egressgw} policy check {manifests}",
        f"      {egressgw} explain --manifests {manifests} --namespace payments --pod api-0"
        " --host db.lab.example --port 5432",
    ]
    if daemon:
        lines += [
            f"      {in_analytics_gw} {egressgw} explain --url {url} --namespace analytics"
            " --pod etl-0 --host web.lab.example --port 80   # denied: exit status 1",
            f"      {in_payments_gw} {egressgw} egress-ips --url {url}",
            f"      {in_payments_gw} curl -s '{url}/v1/decisions?limit=5'   # recent DNS denials",
            f"      {in_payments_gw} curl -s {url}/metrics | grep '^egressgw_dns_queries_total'",
            "dns:  pods ask the cluster DNS (their resolv.conf: "
            f"{CLUSTER_DNS_V4}, {CLUSTER_DNS_V6}, search list, ndots:5); a selected pod's"
            " query is answered by its gateway node",
            f"fail: {egressgw} lab node-down --name {name} {payments_gw.name}"
            f"   # payments fails closed; node-up --name {name} {payments_gw.name} brings it back",
        ]
    lines += [
        f"logs: {manifests.parent}/{{egressgw-<node>,postgres,httpd,dnsmasq,cluster-dns}}.log",
        f"stop: {egressgw} lab down --name {name}",
    ]
    return "\n".join(lines)


def lab_demo(args: argparse.Namespace) -> int:
    problem = _preflight()
    if problem is None:
        problem = services.cluster_available()
    if problem:
        print(f"egressgw lab demo: {problem}", file=sys.stderr)
        return 2
    _sigterm_as_interrupt()
    created = False
    lab: Lab | None = None
    try:
        start = time.monotonic()
        if is_alive(args.name):
            lab = Lab.attach(args.name)
            print(f"using lab {args.name!r}, which is already up")
            for node in list(lab.state.down_nodes):
                lab.bring_node_up(node)
            if not lab.daemon_alive():
                lab.start_daemon()
        else:
            lab = Lab.up(args.name, policies=args.policies)
            created = True
            daemon_s = lab.state.timings_s.get("daemon_ready", 0.0)
            print(
                f"lab {args.name!r} up after {time.monotonic() - start:.1f}s"
                f" (egressgw ready on every node {daemon_s:.1f}s after the start)"
            )
        lab.wait_daemon_ready()
        print()
        keep = args.keep or not created
        results = demo.run_demo(lab, print, bring_back=keep)
        failures = demo.format_failures(results)
        passed = sum(r.ok for r in results)
        print(f"\n{passed}/{len(results)} rows as expected")
        if failures:
            print(failures)
            print(f"egressgw logs: {lab.statedir}/egressgw-<node>.log")
        return 0 if not failures else 1
    except (LabError, ValueError) as exc:
        print(f"egressgw lab demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if lab is not None and created and not args.keep:
            lab.down()
        elif lab is not None:
            print(f"\nlab {args.name!r} left up")
            print(usage(lab.state.name, lab.statedir))


def lab_status(args: argparse.Namespace) -> int:
    try:
        lab = Lab.attach(args.name)
    except (LabError, ValueError) as exc:
        leftovers = [ns for ns in NetnsNames(args.name).all() if Path("/run/netns", ns).exists()]
        print(f"egressgw lab status: {exc}", file=sys.stderr)
        if leftovers:
            print(
                f"namespaces left behind: {' '.join(leftovers)} (egressgw lab down)",
                file=sys.stderr,
            )
        return 1
    status = lab.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"lab {status['name']}: {'ready' if status['ready'] else 'NOT ready'};"
        f" state in {status['statedir']}"
    )
    if status["timings_s"]:
        timings = sorted(status["timings_s"].items(), key=lambda item: item[1])
        phases = ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in timings)
        print(f"up took: {phases} (seconds since the start of `up`, by phase)")
    print("namespaces:")
    for ns, present in status["namespaces"].items():
        print(f"  {ns:<28} {'present' if present else 'MISSING'}")
    print("processes:")
    for role, info in status["processes"].items():
        print(
            f"  {role:<20} pid {info['pid']:<8} {'alive' if info['alive'] else 'DEAD'}"
            f"  log {info['log']}"
        )
    if status["down_nodes"]:
        print(f"nodes down: {' '.join(status['down_nodes'])} (egressgw lab node-up)")
    print("addresses:")
    for ns, lines in status["addresses"].items():
        for line in lines:
            if not line.startswith("lo ") or ns == lab.names.ext:
                print(f"  {ns:<20} {' '.join(line.split())}")
    down_roles = {f"egressgw-{node}" for node in status["down_nodes"]}
    healthy = all(status["namespaces"].values()) and all(
        info["alive"] for role, info in status["processes"].items() if role not in down_roles
    )
    return 0 if healthy else 1


def lab_node_down(args: argparse.Namespace) -> int:
    try:
        lab = Lab.attach(args.name)
        lab.take_node_down(args.node)
    except (LabError, ValueError) as exc:
        print(f"egressgw lab node-down: {exc}", file=sys.stderr)
        return 1
    print(f"{args.node} is down: egressgw killed, unplugged (egressgw lab node-up to undo)")
    return 0


def lab_node_up(args: argparse.Namespace) -> int:
    try:
        lab = Lab.attach(args.name)
        ready_s = lab.bring_node_up(args.node)
    except (LabError, ValueError) as exc:
        print(f"egressgw lab node-up: {exc}", file=sys.stderr)
        return 1
    print(f"{args.node} is up again (egressgw ready after {ready_s:.1f}s)")
    return 0


def lab_down(args: argparse.Namespace) -> int:
    try:
        removed = down(args.name)
    except (LabError, ValueError) as exc:
        print(f"egressgw lab down: {exc}", file=sys.stderr)
        return 1
    if removed:
        print("removed: " + "; ".join(removed))
    else:
        print(f"lab {args.name!r}: nothing to remove")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egressgw.lab")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    # ``python -m egressgw.lab up`` reads as ``egressgw lab up``.
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result
