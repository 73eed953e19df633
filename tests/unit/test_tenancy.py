"""Tenant namespaces: scoping names in and out."""

from __future__ import annotations

import asyncio

from common import tenancy


def test_without_a_tenant_names_are_stored_as_given() -> None:
    assert tenancy.current() == ""
    assert tenancy.scoped("k") == "k" and tenancy.prefix() == ""
    assert tenancy.visible("acme\x1fk")


async def test_a_tenant_scopes_names_only_within_its_own_call() -> None:
    async def as_acme() -> tuple[str, str, bool, bool]:
        tenancy.enter("acme")
        return (tenancy.scoped("k"), tenancy.prefix(), tenancy.visible("acme\x1fk"),
                tenancy.visible("globex\x1fk"))

    assert await asyncio.create_task(as_acme()) == ("acme\x1fk", "acme\x1f", True, False)
    assert tenancy.current() == ""  # the task's context, not ours
    assert tenancy.unscoped("acme\x1fk") == "k" and tenancy.unscoped("k") == "k"
