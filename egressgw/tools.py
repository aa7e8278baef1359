"""Operator commands: ``egressgw egress-ips``, ``egressgw explain`` and ``egressgw cleanup``.

In: a manifests directory (the same files the daemon reads) or the URL of a running daemon's
HTTP listener. Out: text on stdout (tables, JSON or CSV), problems on stderr, and exit codes:
``egress-ips`` 0 or 2 (could not read: a missing directory, an unreachable daemon);
``explain`` 0 allowed (Allow or Audit), 1 denied, 2 no such workload, a malformed question, a
missing directory or an unreachable daemon. Both are read-only.

``cleanup`` is the one that changes the node: it deletes egressgw's nftables table and removes
from the uplink the egress IPs the daemon added (those the table's ``egress_ips`` sets
recorded; the node's own addresses are never touched), and the gateway's end of the tunnel if
its device exists, for uninstalling. The uplink is the one named in the table's rules unless
``--uplink`` says otherwise. ``cleanup --agent`` removes what the agent of a worker node keeps
in the kernel instead: its table, routing rules, routes and tunnel device. Exit status 0 (also
when there was nothing to remove) or 2 with one line saying why not.
"""

from __future__ import annotations

import argparse
import errno
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egressgw.explain import EXIT_ERROR, Explanation, Query, UnknownWorkload, explain
from egressgw.policy.load import load_paths
from egressgw.policy.model import Protocol, Snapshot
from egressgw.report import FORMATS, format_rows, from_json, gateway_egress

if TYPE_CHECKING:
    from egressgw.datapath.keys import IPAddress
    from egressgw.datapath.tunnel import TunnelSettings

HTTP_TIMEOUT_S = 5.0
MAX_PROBLEMS_SHOWN = 5


class Unavailable(Exception):
    """The daemon could not be asked, or answered with an error (the message says which)."""


class CleanupError(Exception):
    """``cleanup`` could not do its work; the message is one line for the operator."""


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
    if not Path(directory).exists():
        raise Unavailable(f"--manifests {directory}: no such file or directory")
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


def _nft(netns: str | None, *argv: str) -> subprocess.CompletedProcess[str]:
    from egressgw.datapath.netns import command

    return subprocess.run(command(netns, ["nft", *argv]), capture_output=True, text=True)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "no reason given"


def _table_uplink(table: str, netns: str | None) -> str | None:
    """The uplink the table's rules name (``oifname != "IFACE" return``), if any."""
    proc = _nft(netns, "-j", "list", "chain", "inet", table, "forward")
    if proc.returncode != 0:
        return None
    try:
        items = json.loads(proc.stdout)["nftables"]
    except (ValueError, KeyError, TypeError):
        return None
    for item in items:
        for expr in item.get("rule", {}).get("expr", []):
            match = expr.get("match", {}) if isinstance(expr, dict) else {}
            left = match.get("left")
            if isinstance(left, dict) and left.get("meta", {}).get("key") == "oifname":
                right = match.get("right")
                return right if isinstance(right, str) else None
    return None


def _recorded_egress_ips(table: str, netns: str | None) -> list[IPAddress]:
    """The egress IPs the table records as added by the daemon (its ``egress_ips`` sets)."""
    from egressgw.datapath import keys
    from egressgw.datapath.netlink import NetlinkError, NftSocket
    from egressgw.datapath.netns import call_in

    sock = call_in(netns, lambda: NftSocket(table, buffer_bytes=1 << 20))
    found: list[IPAddress] = []
    try:
        for family in (4, 6):
            try:
                elements = sock.dump(f"egress_ips{family}")
            except NetlinkError as exc:
                if exc.errno == errno.ENOENT:  # a table without the set records none
                    continue
                raise
            found += sorted(keys.parse_address(e.key) for e in elements)
    finally:
        sock.close()
    return found


def _check_host(netns: str | None) -> None:
    from egressgw.runtime import StartupError, check_host

    try:
        check_host(netns)
    except StartupError as exc:
        raise CleanupError(str(exc)) from None


def _has_interface(name: str, netns: str | None) -> bool:
    import socket

    from egressgw.datapath.netns import call_in

    def index() -> int:
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return 0

    return bool(call_in(netns, index))


def _removed(result: object, generic: str) -> list[str]:
    """The lines a ``remove()`` returned, or ``generic`` when it returned none."""
    if isinstance(result, list | tuple) and result:
        return [str(line) for line in result]
    return [generic]


def cleanup(
    table: str, uplink: str | None, netns: str | None, tunnel: TunnelSettings | None = None
) -> list[str]:
    """Delete the table, remove the egress IPs it records from the uplink and, if its device
    exists, the gateway's end of the tunnel; one line per thing done. Raises
    ``CleanupError``."""
    _check_host(netns)
    link = uplink or _table_uplink(table, netns)
    done = _cleanup_table(table, uplink, netns)
    if tunnel is not None and _has_interface(tunnel.device, netns):
        from egressgw import app

        try:
            result = app.gateway_tunnel(tunnel, table, link or "", netns).remove()
        except Exception as exc:
            raise CleanupError(
                f"could not remove the tunnel (device {tunnel.device}): {_first_line(str(exc))}"
            ) from None
        where = f" in network namespace {netns}" if netns else ""
        done += _removed(
            result, f"removed the tunnel device {tunnel.device}, its reply routes and rule{where}"
        )
    return done


def _agent_state_found(table: str, device: str, netns: str | None) -> bool:
    """Whether the agent's table or tunnel device is there."""
    listed = _nft(netns, "list", "table", "inet", table).returncode == 0
    return listed or _has_interface(device, netns)


def cleanup_agent(table: str, tunnel: TunnelSettings, netns: str | None) -> list[str]:
    """Delete what the agent of a worker node keeps in the kernel: its table, routing rules,
    routes and tunnel device (none of them there: nothing happens). Raises ``CleanupError``."""
    from egressgw import app

    _check_host(netns)
    where = f" in network namespace {netns}" if netns else ""
    found = _agent_state_found(table, tunnel.device, netns)
    try:  # also without either: rules and routes a half-done removal left go too
        result = app.agent_datapath(tunnel, (), (), table, netns).remove()
    except Exception as exc:
        raise CleanupError(f"could not remove the agent's state: {_first_line(str(exc))}") from None
    if not found:
        return [
            f"no nftables table inet {table} and no device {tunnel.device}{where}: nothing to "
            "remove"
        ]
    return _removed(
        result,
        f"removed the agent's nftables table inet {table}, its routing rules and routes, and "
        f"the tunnel device {tunnel.device}{where}",
    )


def _cleanup_table(table: str, uplink: str | None, netns: str | None) -> list[str]:
    from egressgw.datapath.addresses import UplinkAddresses
    from egressgw.datapath.netlink import NetlinkError
    from egressgw.runtime import StartupError, check_uplink

    where = f" in network namespace {netns}" if netns else ""
    listed = _nft(netns, "list", "table", "inet", table)
    if listed.returncode != 0:
        if "No such file or directory" in listed.stderr:
            return [f"no nftables table inet {table}{where}: nothing to remove"]
        raise CleanupError(f"nft cannot list table inet {table}: {_first_line(listed.stderr)}")
    try:
        recorded = _recorded_egress_ips(table, netns)
    except (OSError, NetlinkError) as exc:
        raise CleanupError(f"cannot read the egress IPs of table inet {table}: {exc}") from None
    link = uplink or _table_uplink(table, netns)
    if uplink is not None:
        try:
            check_uplink(uplink, netns)
        except StartupError as exc:
            raise CleanupError(str(exc)) from None
    deleted = _nft(netns, "delete", "table", "inet", table)
    if deleted.returncode != 0:
        raise CleanupError(f"nft cannot delete table inet {table}: {_first_line(deleted.stderr)}")
    done = [f"removed nftables table inet {table}{where}"]
    if not recorded:
        return done
    left = " ".join(str(a) for a in recorded)
    if link is None:
        done.append(f"egress IPs left in place, the uplink is unknown: {left} (use --uplink)")
        return done
    try:
        addresses = UplinkAddresses(link, netns)
    except LookupError:
        done.append(f"egress IPs left in place, no interface {link}{where}: {left}")
        return done
    try:
        removed = addresses.sync([], recorded).removed
    except OSError as exc:
        raise CleanupError(
            f"could not remove egress IPs {left} from {link}: {exc.strerror or exc}"
        ) from None
    finally:
        addresses.close()
    done += [f"removed egress IP {a} from {link}" for a in removed]
    absent = [a for a in recorded if a not in removed]
    if absent:
        done.append(f"not on {link} (nothing to remove): {' '.join(str(a) for a in absent)}")
    return done


def _cleanup(args: argparse.Namespace) -> int:
    from egressgw.datapath.tunnel import TunnelSettings

    tunnel = TunnelSettings(device=args.tunnel_device)
    try:
        if args.agent:
            if args.uplink is not None:
                raise CleanupError("--uplink is the gateway's; the agent has no egress IPs")
            lines = cleanup_agent(args.table or "egressgw_agent", tunnel, args.netns)
        else:
            lines = cleanup(args.table or "egressgw", args.uplink, args.netns, tunnel)
    except CleanupError as exc:
        print(f"egressgw cleanup: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for line in lines:
        print(line)
    return 0


def _source(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--manifests",
        metavar="DIR",
        help="answer from these manifests alone, as the daemon would read them (no daemon needed)",
    )
    where.add_argument(
        "--url",
        metavar="http://ADDR:PORT",
        help="ask a running daemon (its --http-listen address)",
    )


def add_parsers(sub: Any) -> None:
    """Add ``egress-ips``, ``explain`` and ``cleanup`` to the ``egressgw`` subcommands."""
    from egressgw.cli import interface_name, table_name
    from egressgw.datapath.tunnel import DEVICE

    ips = sub.add_parser(
        "egress-ips",
        help="every gateway with its namespaces and egress IPs (for firewall allowlists)",
        description="Every gateway with its namespaces and egress IPs, and (from a daemon) "
        "whether the node asked holds each one (HELD) and which node holds it, as far as that "
        "daemon knows (NODE; '-' when not known). Exit status: 0, or 2 when the manifests or the "
        "daemon cannot be read.",
    )
    ips.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table for people, json or csv for automation (default: %(default)s)",
    )
    _source(ips)
    ips.set_defaults(func=_egress_ips)

    why = sub.add_parser(
        "explain",
        help="would this workload's connection be allowed, and why",
        description="Exit status: 0 allowed (Allow or Audit), 1 denied, 2 cannot answer.",
    )
    why.add_argument("--namespace", required=True, help="the workload's namespace")
    who = why.add_mutually_exclusive_group(required=True)
    who.add_argument("--pod", metavar="NAME", help="the workload's pod name")
    who.add_argument("--ip", metavar="ADDR", help="the pod's IP")
    to = why.add_mutually_exclusive_group(required=True)
    to.add_argument("--host", metavar="NAME", help="a DNS name the workload resolves")
    to.add_argument("--address", metavar="ADDR", help="a destination address (needs --port)")
    why.add_argument(
        "--port", type=int, metavar="PORT", help="destination port (default: any port)"
    )
    why.add_argument(
        "--protocol",
        type=str.upper,
        choices=[p.value for p in Protocol],
        help="transport protocol (default: TCP when --port is given)",
    )
    why.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text for people, json for automation (default: %(default)s)",
    )
    _source(why)
    why.set_defaults(func=_explain)

    clean = sub.add_parser(
        "cleanup",
        help="remove egressgw's nftables table, the egress IPs and the tunnel it added "
        "(uninstall); --agent: the agent's",
        description="Delete the nftables table, remove from the uplink the egress IPs the "
        "daemon added (as the table records them; the node's own addresses stay) and the "
        "gateway's end of the tunnel if its device exists. With --agent, remove the agent's "
        "state from a worker node instead: its table, routing rules, routes and tunnel device "
        "(its pods then leave by the node's normal path). Stop the daemon or the agent first: "
        "a running one would create its state again. Needs root (CAP_NET_ADMIN). Exit status: "
        "0 (also when there is nothing to remove), 2 cannot.",
    )
    clean.add_argument(
        "--agent",
        action="store_true",
        help="remove the agent's state (egressgw agent) instead of the gateway's",
    )
    clean.add_argument(
        "--table",
        type=table_name,
        metavar="NAME",
        help="the daemon's or the agent's --table (default: egressgw; with --agent: "
        "egressgw_agent)",
    )
    clean.add_argument(
        "--tunnel-device",
        type=interface_name,
        default=DEVICE,
        metavar="NAME",
        help="the daemon's or the agent's --tunnel-device (default: %(default)s)",
    )
    clean.add_argument(
        "--uplink",
        metavar="IFACE",
        help="interface the egress IPs are on (default: the one the table's rules name)",
    )
    clean.add_argument(
        "--netns",
        metavar="NAME",
        help="for tests and labs: clean this network namespace (default: this one)",
    )
    clean.set_defaults(func=_cleanup)
