"""The ``egressgw`` command: run the daemon, check policies, drive the lab."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from egressgw import __version__

if TYPE_CHECKING:
    from egressgw.runtime import Settings


def host_port(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{host!r} is not an IP address") from None
    return host, int(port)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def settings_of(args: argparse.Namespace) -> Settings:
    """The daemon's Settings from ``egressgw run``'s arguments."""
    from egressgw.dns.interceptor import DnsSettings
    from egressgw.dns.wire import NXDOMAIN, REFUSED
    from egressgw.runtime import Settings

    dns = DnsSettings(
        min_ttl_s=args.min_ttl,
        max_ttl_s=args.max_ttl,
        grace_s=args.grace,
        program_timeout_s=args.program_timeout_ms / 1000,
        deny_rcode={"NXDOMAIN": NXDOMAIN, "REFUSED": REFUSED}[args.deny_rcode],
        negative_ttl_s=args.negative_ttl,
        passthrough_domains=tuple(args.passthrough_domain),
        max_addresses_per_name=args.max_addresses_per_name,
        max_addresses_per_identity=args.max_addresses_per_identity,
        rate_per_source_qps=args.rate_limit,
        burst_per_source=args.rate_limit * 2,
    )
    return Settings(
        uplink=args.uplink,
        manifests=Path(args.manifests) if args.manifests else None,
        table=args.table,
        http_listen=args.http_listen,
        dns_listen=tuple(args.dns_listen),
        upstreams=tuple(args.upstream),
        upstream_timeout_s=args.upstream_timeout_ms / 1000,
        dns=dns,
        netns=args.netns,
        node_name=args.node_name or "",
        netlink_buffer_bytes=args.netlink_buffer_bytes,
        dns_tcp_per_source=args.dns_tcp_per_source,
        dns_tcp_pipeline=args.dns_tcp_pipeline,
    )


def _run(args: argparse.Namespace) -> int:
    from egressgw import app

    kube = None
    if args.kubernetes:
        kube = app.KubeSettings(
            node_name=args.node_name or "",
            kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
            lease_namespace=args.lease_namespace,
            lease_duration_s=args.lease_duration,
        )
    try:
        gateway = app.build_gateway(settings_of(args), kube)
    except app.ConfigError as exc:
        print(f"egressgw run: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(gateway.run())


def _policy_check(args: argparse.Namespace) -> int:
    from egressgw.policy.check import check_paths

    return check_paths(args.paths)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egressgw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"egressgw {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line (time, level, logger, message, decision fields)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway daemon")
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--manifests",
        metavar="DIR",
        help="directory of Namespace, Pod, EgressGateway and EgressPolicy YAML",
    )
    mode.add_argument(
        "--kubernetes",
        action="store_true",
        help="read the objects from the API server, write status, hold egress IPs by Lease",
    )
    kube = run.add_argument_group("Kubernetes mode")
    kube.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file (default: the in-cluster service account)",
    )
    kube.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME"),
        metavar="NAME",
        help="this node's name, for Leases and nodeSelectors (default: $NODE_NAME)",
    )
    kube.add_argument(
        "--lease-namespace",
        default="egressgw-system",
        metavar="NS",
        help="namespace of the egress IP Leases",
    )
    kube.add_argument(
        "--lease-duration",
        type=positive_int,
        default=10,
        metavar="SECONDS",
        help="an egress IP moves to another node within this time after its holder fails",
    )
    run.add_argument(
        "--netns",
        metavar="NAME",
        help="for tests and labs only: program the datapath in this network namespace",
    )
    run.add_argument(
        "--uplink",
        required=True,
        metavar="IFACE",
        help="interface toward the external network; egress IPs are added here",
    )
    run.add_argument(
        "--http-listen",
        type=host_port,
        metavar="ADDR:PORT",
        help="serve /healthz, /readyz and /metrics",
    )
    run.add_argument("--table", default="egressgw", help="nftables table name (inet family)")
    run.add_argument(
        "--netlink-buffer-bytes",
        type=positive_int,
        default=32 * 1024 * 1024,
        metavar="BYTES",
        help="socket buffer asked for the nftables netlink socket (the kernel doubles it); a "
        "change larger than one buffer is applied in steps that never open before they close "
        "(default: 32 MiB)",
    )
    dns = run.add_argument_group("DNS interceptor")
    dns.add_argument(
        "--dns-listen",
        type=host_port,
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="answer workloads' DNS here (UDP and TCP)",
    )
    dns.add_argument(
        "--upstream",
        type=host_port,
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="resolver to forward allowed names to, in order",
    )
    dns.add_argument(
        "--upstream-timeout-ms",
        type=positive_int,
        default=1000,
        help="per-try timeout before the next upstream",
    )
    dns.add_argument("--min-ttl", type=positive_int, default=5, help="lowest TTL released (s)")
    dns.add_argument("--max-ttl", type=positive_int, default=3600, help="highest TTL released (s)")
    dns.add_argument(
        "--negative-ttl",
        type=positive_int,
        default=60,
        metavar="SECONDS",
        help="seconds downstream caches may keep the NXDOMAIN of a denied name: the TTL of the "
        "SOA it carries (default: 60)",
    )
    dns.add_argument(
        "--dns-tcp-per-source",
        type=positive_int,
        default=16,
        metavar="N",
        help="DNS-over-TCP connections one source address may hold at once; one more is closed "
        "at once (default: 16)",
    )
    dns.add_argument(
        "--dns-tcp-pipeline",
        type=positive_int,
        default=16,
        metavar="N",
        help="queries of one DNS-over-TCP connection answered at once, each as it is ready "
        "(default: 16)",
    )
    dns.add_argument(
        "--grace",
        type=positive_int,
        default=10,
        help="seconds a learned address outlives the TTL released with it",
    )
    dns.add_argument(
        "--program-timeout-ms",
        type=positive_int,
        default=250,
        help="answer SERVFAIL if programming the datapath takes longer",
    )
    dns.add_argument("--deny-rcode", choices=["NXDOMAIN", "REFUSED"], default="NXDOMAIN")
    dns.add_argument(
        "--passthrough-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="forward names under DOMAIN without programming (e.g. cluster.local)",
    )
    dns.add_argument("--max-addresses-per-name", type=positive_int, default=64)
    dns.add_argument("--max-addresses-per-identity", type=positive_int, default=4096)
    dns.add_argument(
        "--rate-limit",
        type=positive_int,
        default=500,
        help="queries per second per source address (burst: twice that)",
    )
    run.set_defaults(func=_run)

    policy = sub.add_parser("policy", help="work with EgressGateway and EgressPolicy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate manifests; exit 1 on any problem")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(func=_policy_check)

    from egressgw.tools import add_parsers as add_operator_parsers

    add_operator_parsers(sub)

    try:
        from egressgw.lab.cli import add_lab_parser
    except ImportError:  # the lab is optional at run time (e.g. in the container image)
        pass
    else:
        add_lab_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from egressgw.logs import configure

    configure(args.log_level, args.log_format)
    result: int = args.func(args)
    return result
