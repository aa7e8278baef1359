"""The API server as a worker agent's source of desired state: its own pods, gateways, nodes.

In: every Namespace, EgressGateway and Node (the agent needs the gateway nodes' tunnel
addresses, and its own), and only the Pods scheduled on this node: their watch carries the field
selector ``spec.nodeName=<node>``, so the API server sends nothing about other nodes' pods. Each
kind is followed by a ``Reflector`` thread. Out: whole Snapshots (``contracts.Source``) of the
namespaces, this node's workload pods (each with its node name), the gateways and the nodes, with
no EgressPolicies (what the agent steers does not depend on them), and the problems of invalid
objects. It writes nothing to the API server and may not touch the datapath.

Rules, the same as the gateway's source (``kube.source``) wherever they overlap:
- nothing is yielded before every kind has been listed once: a half-read cluster would look like
  deleted pods or gateways, and the agent would stop steering them;
- a Pod is a workload only while ``status.phase`` is Running and ``status.podIPs`` has an
  address, and never on the host network (``source.workload_pod``); a Pod that names another
  node is left out even if the server sent it, so only addresses of this node's pods are ever
  steered;
- of a Node only its name, labels and ``status.addresses`` are read (``source.readable_node``):
  the status updates a kubelet makes all the time change none of them and yield nothing;
- every object goes through ``policy.load.parse_object``, so an invalid one is reported in the
  same words as in files and left out while the others stay in force;
- an API outage removes nothing: the last objects seen stay in force until the API answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from egressgw.kube.reflector import Obj
from egressgw.kube.source import KubeSource, workload_pod

AGENT_KINDS = ("Namespace", "Pod", "EgressGateway", "Node")


def node_pod(pod: Mapping[str, Any], node_name: str) -> Obj | None:
    """What ``parse_object`` reads of a Pod on ``node_name`` that is a workload (its node name
    included); None for any other Pod."""
    if (pod.get("spec") or {}).get("nodeName") != node_name:
        return None
    return workload_pod(pod)


class KubeAgentSource(KubeSource):
    """``Source`` for the agent on ``node_name``: ``KubeSource`` watching only this node's Pods,
    and no EgressPolicies."""

    KINDS = AGENT_KINDS
    SYNCED_LINE = "every kind listed; steering"
    THREAD_PREFIX = "agent-watch-"

    def _pod_list_kwargs(self) -> dict[str, str]:
        return {"field_selector": f"spec.nodeName={self.node_name}"}

    def _readable(self, kind: str, obj: Obj) -> Obj | None:
        if kind == "Pod":
            return node_pod(obj, self.node_name)
        return super()._readable(kind, obj)
