"""The manifests directory every egressgw process of the lab reads: the cluster, plus policies.

In: the lab topology and a policies directory. Out: ``<statedir>/manifests/cluster.yaml`` (the
lab's Namespaces, Nodes with their labels and InternalIPs, and Pods with their node and
addresses) and a copy of every ``*.yaml`` file of the policies directory, whose EgressGateways
pick their gateway node by those labels. Only files under the lab's state directory are written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from egressgw.lab.topology import NAMESPACES, NODES, PODS

CLUSTER_FILE = "cluster.yaml"
DEFAULT_POLICIES_DIR = Path(__file__).resolve().parents[2] / "policies"


def cluster_objects() -> list[dict[str, Any]]:
    """The lab's Namespaces, Nodes and Pods as Kubernetes objects (only the fields egressgw
    reads)."""
    objects: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns.name, "labels": dict(ns.labels)},
            }
        )
    for node in NODES:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": dict(node.labels)},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": node.ipv4},
                        {"type": "InternalIP", "address": node.ipv6},
                        {"type": "Hostname", "address": node.name},
                    ]
                },
            }
        )
    for pod in PODS:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "namespace": pod.namespace,
                    "name": pod.name,
                    "labels": dict(pod.labels),
                },
                "spec": {"nodeName": pod.node},
                "status": {"podIPs": [{"ip": pod.ipv4}, {"ip": pod.ipv6}]},
            }
        )
    return objects


def cluster_yaml(objects: list[dict[str, Any]] | None = None) -> str:
    """``cluster.yaml``'s text: ``objects`` (default: ``cluster_objects()``) as YAML documents."""
    return "# Written by `egressgw lab up`: the lab's namespaces, nodes and pods.\n" + (
        yaml.safe_dump_all(cluster_objects() if objects is None else objects, sort_keys=False)
    )


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so a watcher never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifests(manifests_dir: Path, policies_dir: Path) -> list[Path]:
    """Fill ``manifests_dir``; returns the files written. Missing policies are not an error."""
    manifests_dir.mkdir(parents=True, exist_ok=True)
    cluster = manifests_dir / CLUSTER_FILE
    write_atomically(cluster, cluster_yaml())
    written = [cluster]
    if policies_dir.is_dir():
        for source in sorted(policies_dir.glob("*.yaml")):
            if source.name == CLUSTER_FILE:
                continue
            target = manifests_dir / source.name
            shutil.copyfile(source, target)
            written.append(target)
    return written
