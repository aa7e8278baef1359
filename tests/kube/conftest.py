"""Fixtures shared by the Kubernetes tests: ``kube``, an API client of the official library
for the module's own ``api`` fixture (a ``FakeApiServer`` holding that module's objects)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from egressgw.kube.api import api_client
from egressgw.testing.apiserver import FakeApiServer, kubeconfig


@pytest.fixture
def kube(api: FakeApiServer, tmp_path: Path) -> client.ApiClient:
    path = tmp_path / "kubeconfig"
    path.write_text(kubeconfig(api.url))
    return api_client(path)
