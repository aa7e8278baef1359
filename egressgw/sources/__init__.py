"""Where desired state comes from: a directory of manifests, or the Kubernetes API.

In: files or API objects. Out: whole Snapshots of valid objects, plus problems to report.
A source never touches the datapath; an invalid input never removes what was valid before.
"""
