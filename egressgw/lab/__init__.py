"""The egressgw lab: a small cluster built from network namespaces on one Linux machine.

In: a lab name (``egl`` by default) and a directory of policies. Out: two worker nodes running
``egressgw agent`` with pods of two projects and an unselected pod each, two gateway nodes running
``egressgw run --node-name`` (each holds one project's egress IPs, chosen by its Node labels), a
cluster DNS the pods resolve through (Kubernetes-style resolv.conf), a node router that masquerades
ordinary node egress, and an external network with PostgreSQL, an HTTP echo server and dnsmasq;
plus ``lab demo``, which probes every (pod, destination) pair, fails a gateway node and probes
again, comparing what DNS answered, what the connection did and the source the server saw with the
tables of ``demo``.

It builds the lab in network namespaces only and never touches the root namespace: no address,
route, link or nftables state is ever added there. It uses only documentation address ranges, and
everything it creates (namespaces, processes, ``/etc/netns/<ns>``, ``/run/egressgw-lab/<name>``) is
removed by ``down``, by recorded state and by name.
"""

from egressgw.lab.lab import Lab, down, is_alive, lab_up
from egressgw.lab.netns import LabError
from egressgw.lab.probes import Outcome, Verdict

__all__ = ["Lab", "LabError", "Outcome", "Verdict", "down", "is_alive", "lab_up"]
