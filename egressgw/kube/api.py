"""Connecting to the API server: configuration and the errors egressgw tells apart.

In: a kubeconfig path, or the in-cluster service account. Out: an ``ApiClient`` of the official
client. No request is made here.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

GROUP = "egressgw.io"
VERSION = "v1alpha1"


class KubeError(Exception):
    """egressgw could not talk to the API server the way it needs to."""


class ConfigError(KubeError):
    """No usable API server configuration."""


def api_client(kubeconfig: Path | None = None) -> client.ApiClient:
    """An ApiClient from ``kubeconfig``, or from the pod's service account when it is None."""
    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                str(kubeconfig), client_configuration=configuration
            )
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except (ConfigException, OSError) as exc:
        where = kubeconfig or "the in-cluster service account"
        raise ConfigError(f"cannot load the API server configuration from {where}: {exc}") from exc
    configuration.retries = 0  # egressgw retries by itself, with its own backoff and deadlines
    return client.ApiClient(configuration)
