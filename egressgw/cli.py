"""The ``egressgw`` command: run the daemon, check policies, drive the lab."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from egressgw import __version__


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


def _run(args: argparse.Namespace) -> int:
    from egressgw.runtime import Daemon, Settings

    settings = Settings(
        uplink=args.uplink,
        manifests=Path(args.manifests),
        table=args.table,
        http_listen=args.http_listen,
    )
    if not settings.manifests.is_dir():
        print(f"egressgw run: --manifests {settings.manifests} is not a directory", file=sys.stderr)
        return 2
    return asyncio.run(Daemon(settings).run())


def _policy_check(args: argparse.Namespace) -> int:
    from egressgw.policy.check import check_paths

    return check_paths(args.paths)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egressgw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"egressgw {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument(
        "--manifests",
        required=True,
        metavar="DIR",
        help="directory of Namespace, Pod, EgressGateway and EgressPolicy YAML",
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
    run.set_defaults(func=_run)

    policy = sub.add_parser("policy", help="work with EgressGateway and EgressPolicy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate manifests; exit 1 on any problem")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(func=_policy_check)

    try:
        from egressgw.lab.cli import add_lab_parser
    except ImportError:  # the lab is optional at run time (e.g. in the container image)
        pass
    else:
        add_lab_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    result: int = args.func(args)
    return result
