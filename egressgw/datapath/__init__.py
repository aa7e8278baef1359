"""The kernel datapath: the only package that touches the kernel.

In: a DesiredState (identities, workload addresses, SNAT targets, CIDR boxes) and Learned
destinations. Out: one nftables ``inet`` table whose rules are constant (``skeleton``) and whose
set and map elements carry everything else, written over netlink with pyroute2 one transaction per
change (``netlink``, ``kernel``), and egress IP addresses on the uplink (``addresses``).
It may not decide policy: it programs what it is told, and reports what the kernel refused.
"""
