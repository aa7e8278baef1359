"""egressgw's own VXLAN tunnel between worker and gateway nodes.

(To be written: device, FDB, neighbours, routes and rules over pyroute2.)
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE = "egw0"
VNI = 7795  # Flannel uses VNI 1 on port 8472, Calico 4096 on 4789, Cilium port 8472
PORT = 7795


@dataclass(frozen=True)
class TunnelSettings:
    device: str = DEVICE
    vni: int = VNI
    port: int = PORT
