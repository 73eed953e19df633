"""Tenant namespaces: every key, lock, stream and queue belongs to its caller's tenant.

With authentication on, a call's token names its tenant, and the node serving
it stores each name the call gives as ``<tenant> US <name>`` (US is the ASCII
unit separator, 0x1F, which names may not contain). Routing hashes only what
follows the separator (`common.slots`), so a name lives in the same slot for
every tenant and clients need not know their tenant to route. Without
authentication there is no tenant and names are stored as given.

The tenant travels in a context variable, set once per call by the node's
authentication wrapper (`nodes.rpc`); a forwarded call is authenticated, and
scoped, again by the node that serves it.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["SEPARATOR", "current", "enter", "prefix", "scoped", "unscoped", "visible"]

SEPARATOR = "\x1f"
"""Between a tenant and a name; never inside a name given by a caller."""

_tenant: ContextVar[str] = ContextVar("mesh_tenant", default="")


def enter(tenant: str) -> None:
    """The current call acts for ``tenant`` (set by the authentication wrapper)."""
    _tenant.set(tenant)


def current() -> str:
    """The current call's tenant; "" without authentication."""
    return _tenant.get()


def prefix() -> str:
    """What every stored name of the current tenant starts with ("" for none)."""
    tenant = _tenant.get()
    return tenant + SEPARATOR if tenant else ""


def scoped(name: str) -> str:
    """The stored form of a name the current call gave."""
    tenant = _tenant.get()
    return f"{tenant}{SEPARATOR}{name}" if tenant else name


def unscoped(name: str) -> str:
    """The name as its tenant knows it (a stored name, on its way out)."""
    return name.partition(SEPARATOR)[2] if SEPARATOR in name else name


def visible(name: str) -> bool:
    """Whether a stored name belongs to the current call's tenant."""
    tenant = _tenant.get()
    return name.startswith(tenant + SEPARATOR) if tenant else True
