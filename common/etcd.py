"""Connecting to etcd with aetcd, with a deadline on every call."""

from __future__ import annotations

import aetcd

# Every etcd call made through a client from here is bounded by this many seconds.
CALL_TIMEOUT = 3


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (or ``http://host:port``) -> ``(host, port)``."""
    endpoint = endpoint.removeprefix("http://")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def client_for(endpoints: tuple[str, ...] | list[str], timeout: int = CALL_TIMEOUT) -> aetcd.Client:
    """An unconnected aetcd client for the first endpoint.

    aetcd speaks to one endpoint; gRPC reconnects to it by itself when etcd
    restarts, which is what a development mesh needs. Production setups put the
    etcd cluster behind one address (a load balancer or DNS name).
    """
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    host, port = split_endpoint(endpoints[0])
    return aetcd.Client(host=host, port=port, timeout=timeout)
