"""Kubernetes mode: the API server as the source of desired state, status, and Lease ownership.

In: the API server, through the official ``kubernetes`` client (synchronous, so every call runs
in a worker thread, never on the event loop): Namespaces, Pods, Nodes (this node only),
EgressGateways, EgressPolicies and coordination.k8s.io Leases. Out: whole Snapshots for the
daemon (``source``), which egress IPs this node holds (``leases``), and the status of the
EgressGateway and EgressPolicy objects (``status``). Only status subresources and Leases are
ever written.

It may not touch the datapath: the daemon applies what it returns. An API outage never removes
state: the last known objects stay in force until the API answers again, except egress IPs,
which are given up before their Lease could expire.
"""
