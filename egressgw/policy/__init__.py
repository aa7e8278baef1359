"""Policy: objects, validation, wildcard matching, decisions with reasons.

In: manifests (files or API object dicts) and questions about one workload's traffic.
Out: validated immutable objects (``model``), problems that say how to fix them (``load``),
which gateway and policies select each pod (``select``), and verdicts with exact human
reasons (``decide``).

Pure: no I/O (except ``load`` reading the files it is given, and ``schema`` reading the CRDs
shipped with the package), no clock, no imports from higher layers.
"""
