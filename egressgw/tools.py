"""Operator commands: ``egressgw egress-ips`` and ``egressgw explain``.

In: a manifests directory (the same files the daemon reads) or the URL of a running daemon's
HTTP listener. Out: text on stdout (tables, JSON or CSV), problems on stderr, and exit codes:
``egress-ips`` 0 or 2 (could not read); ``explain`` 0 allowed (Allow or Audit), 1 denied,
2 no such workload, a malformed question or an unreachable daemon. Read-only.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from egressgw.explain import EXIT_ERROR, Explanation, Query, UnknownWorkload, explain
from egressgw.policy.load import load_paths
from egressgw.policy.model import Protocol, Snapshot
from egressgw.report import FORMATS, format_rows, from_json, gateway_egress

HTTP_TIMEOUT_S = 5.0
MAX_PROBLEMS_SHOWN = 5


class Unavailable(Exception):
    """The daemon could not be asked, or answered with an error (the message says which)."""


def _get_json(base: str, path: str, params: dict[str, str] | None = None) -> Any:
    url = base.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        raise Unavailable(f"{url}: {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unavailable(f"cannot ask {url}: {getattr(exc, 'reason', exc)}") from None


def _load(directory: str, command: str) -> Snapshot:
    result = load_paths([directory])
    if result.problems:
        print(
            f"egressgw {command}: {len(result.problems)} problem(s) in {directory}; those objects "
            f"are left out, as the daemon would (see: egressgw policy check {directory})",
            file=sys.stderr,
        )
        for problem in result.problems[:MAX_PROBLEMS_SHOWN]:
            print(f"  {problem}", file=sys.stderr)
    return result.snapshot


def _egress_ips(args: argparse.Namespace) -> int:
    try:
        if args.url:
            rows = from_json(_get_json(args.url, "/v1/egress-ips"))
        else:
            rows = gateway_egress(_load(args.manifests, "egress-ips"))
    except (Unavailable, KeyError, TypeError, ValueError) as exc:
        print(f"egressgw egress-ips: {exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(format_rows(rows, args.format))
    return 0


def _explain(args: argparse.Namespace) -> int:
    try:
        query = Query(
            namespace=args.namespace,
            pod=args.pod,
            ip=args.ip,
            host=args.host,
            address=args.address,
            port=args.port,
            protocol=args.protocol,
        )
        if args.url:
            answer = Explanation.from_json(_get_json(args.url, "/v1/explain", query.to_params()))
        else:
            answer = explain(_load(args.manifests, "explain"), query)
    except (UnknownWorkload, Unavailable, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, UnknownWorkload) else exc
        print(f"egressgw explain: {message}", file=sys.stderr)
        return EXIT_ERROR
    if args.format == "json":
        print(json.dumps(answer.to_json(), indent=2))
    else:
        sys.stdout.write(answer.text())
    return answer.exit_code


def _source(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--manifests", metavar="DIR", help="answer from these manifests alone (no daemon needed)"
    )
    where.add_argument(
        "--url",
        metavar="http://ADDR:PORT",
        help="ask a running daemon (its --http-listen address)",
    )


def add_parsers(sub: Any) -> None:
    """Add ``egress-ips`` and ``explain`` to the ``egressgw`` subcommands."""
    ips = sub.add_parser(
        "egress-ips",
        help="every gateway with its namespaces and egress IPs (for firewall allowlists)",
    )
    ips.add_argument("--format", choices=FORMATS, default="table")
    _source(ips)
    ips.set_defaults(func=_egress_ips)

    why = sub.add_parser(
        "explain",
        help="would this workload's connection be allowed, and why",
        description="Exit status: 0 allowed (Allow or Audit), 1 denied, 2 cannot answer.",
    )
    why.add_argument("--namespace", required=True)
    who = why.add_mutually_exclusive_group(required=True)
    who.add_argument("--pod", metavar="NAME")
    who.add_argument("--ip", metavar="ADDR", help="the pod's IP")
    to = why.add_mutually_exclusive_group(required=True)
    to.add_argument("--host", metavar="NAME", help="a DNS name the workload resolves")
    to.add_argument("--address", metavar="ADDR", help="a destination address (needs --port)")
    why.add_argument("--port", type=int)
    why.add_argument(
        "--protocol",
        type=str.upper,
        choices=[p.value for p in Protocol],
        help="default TCP when --port is given",
    )
    why.add_argument("--format", choices=("text", "json"), default="text")
    _source(why)
    why.set_defaults(func=_explain)
