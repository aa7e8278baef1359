"""The egressgw lab: a small cluster built from network namespaces on one Linux machine.

In: a lab name (``egl`` by default) and a directory of policies. Out: pods of two projects and an
unselected one, a worker that bridges them, a gateway that runs the egressgw daemon (the pods
resolve names through its DNS interceptor), and an external network with PostgreSQL, an HTTP echo
server and dnsmasq; plus ``lab demo``, which probes every (pod, destination) pair and compares what
DNS answered and what the connection did with ``demo.EXPECTED``.

It builds the lab in network namespaces only and never touches the root namespace: no address,
route, link or nftables state is ever added there. It uses only documentation address ranges, and
everything it creates (namespaces, processes, ``/etc/netns/<ns>``, ``/run/egressgw-lab/<name>``) is
removed by ``down``, by recorded state and by name.
"""

from egressgw.lab.lab import Lab, down, is_alive, lab_up
from egressgw.lab.netns import LabError
from egressgw.lab.probes import Outcome, Verdict

__all__ = ["Lab", "LabError", "Outcome", "Verdict", "down", "is_alive", "lab_up"]
