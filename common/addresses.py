"""Listen and advertise addresses: what a port binds, and what others are told.

A process binds ``--listen`` (``host:port``; port 0 picks a free one) and
registers the address others use to reach it: ``--advertise``, which may be a
host name or address alone (the bound port is added) or ``host:port`` (behind
NAT or a proxy, as given). Without it the listen host is registered, which only
works when it is one other hosts can reach: ``0.0.0.0`` or ``::`` (every
interface) is refused at start, naming the flag to give.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Endpoint", "host_of"]

_EVERY_INTERFACE = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def _split(address: str) -> tuple[str, str]:
    """``host:port`` -> ``(host, port)``; a bare host (or ``[v6]``) -> ``(host, "")``."""
    if address.startswith("["):  # [v6] or [v6]:port
        host, _, rest = address.partition("]")
        return host + "]", rest.removeprefix(":")
    host, colon, port = address.rpartition(":")
    if not colon or ":" in host:  # no port, or a bare IPv6 address
        return address, ""
    return host, port


def host_of(address: str) -> str:
    """The host part of ``host:port`` (or of a bare host)."""
    return _split(address)[0]


@dataclass(frozen=True)
class Endpoint:
    """One port of a process."""

    listen: str
    """``host:port`` to bind."""
    advertise: str = ""
    """``host`` or ``host:port`` others use; "" = the listen host."""

    def problem(self, listen_flag: str, advertise_flag: str) -> str | None:
        """Why the address this port would register is unusable, or None."""
        if self.advertise:
            host, port = _split(self.advertise)
            if host in _EVERY_INTERFACE:
                return (f"{advertise_flag} {self.advertise}: not an address other hosts can "
                        "reach; give this host's name or address")
            if port and not port.isdigit():
                return f"{advertise_flag} {self.advertise}: expected HOST or HOST:PORT"
            return None
        if host_of(self.listen) in _EVERY_INTERFACE:
            return (f"{listen_flag} {self.listen} listens on every interface, which is no "
                    f"address to give others: add {advertise_flag} with this host's name or "
                    "address")
        return None

    def address(self, port: int) -> str:
        """What to register, once the port is bound to ``port``."""
        if self.advertise:
            host, advertised_port = _split(self.advertise)
            return f"{host}:{advertised_port or port}"
        return f"{host_of(self.listen) or '127.0.0.1'}:{port}"
