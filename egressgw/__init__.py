"""egressgw: an egress gateway with an FQDN firewall and static per-project egress IPs.

Layers, lowest first (a layer never imports a higher one):
  policy/   pure objects, validation, matching, decisions;     identity  address -> workload
  datapath/ the only code that touches the kernel;             plan      objects -> datapath state
  sources/  manifests directory or Kubernetes API;             metrics, web, runtime, cli
"""

__version__ = "0.1.0"
