"""Test doubles of egressgw's side-effecting parts, typed against ``egressgw.contracts``.

In: what a test sets up. Out: ``datapath.FakeDatapath`` (a ``Programmer`` that records what
the DNS path programs), ``upstream.FakeUpstream`` (an ``Upstream`` answering from a table of
records), ``apiserver.FakeApiServer`` (an in-process HTTP server speaking the Kubernetes API
paths, so the official client's code runs against it). Product code never imports this package,
and it is not part of the wheel or the image (``tests/unit/test_packaging.py`` checks both).
"""
