"""The manifests directory the lab's daemon reads: the lab's Namespaces and Pods, plus policies.

In: the lab topology and a policies directory. Out: ``<statedir>/manifests/cluster.yaml`` and a copy
of every ``*.yaml`` file of the policies directory. Only files under the lab's state directory are
written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from egressgw.lab.topology import NAMESPACES, PODS

CLUSTER_FILE = "cluster.yaml"
DEFAULT_POLICIES_DIR = Path(__file__).resolve().parents[2] / "policies"


def cluster_objects() -> list[dict[str, Any]]:
    """The lab's Namespaces and Pods as Kubernetes objects (only the fields egressgw reads)."""
    objects: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns.name, "labels": dict(ns.labels)},
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
                "status": {"podIPs": [{"ip": pod.ipv4}, {"ip": pod.ipv6}]},
            }
        )
    return objects


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so a watcher never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifests(manifests_dir: Path, policies_dir: Path) -> list[Path]:
    """Fill ``manifests_dir``; returns the files written. Missing policies are not an error."""
    manifests_dir.mkdir(parents=True, exist_ok=True)
    cluster = manifests_dir / CLUSTER_FILE
    write_atomically(
        cluster,
        "# Written by `egressgw lab up`: the lab's namespaces and pods.\n"
        + yaml.safe_dump_all(cluster_objects(), sort_keys=False),
    )
    written = [cluster]
    if policies_dir.is_dir():
        for source in sorted(policies_dir.glob("*.yaml")):
            if source.name == CLUSTER_FILE:
                continue
            target = manifests_dir / source.name
            shutil.copyfile(source, target)
            written.append(target)
    return written
