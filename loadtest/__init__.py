"""Load tests and benchmarks of egressgw, each reporting ratios against a same-run baseline.

``python -m loadtest.datapath`` (``make bench``): the kernel datapath against plain SNAT, and
netlink element batches against ``nft`` subprocesses. See loadtest/README.md.
"""
