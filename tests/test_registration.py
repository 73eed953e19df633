"""A node's registration on a real etcd: rewritten in place under its lease (what
`nodes.stalls` publishes), never over a key another process holds."""

from __future__ import annotations

import pytest

from common.etcd import client_for
from common.localmesh import Etcd
from nodes.registration import Registration

pytestmark = pytest.mark.timeout(30)


async def test_an_update_rewrites_the_value_under_the_same_lease(etcd: Etcd) -> None:
    client = client_for(etcd.endpoint)
    key = b"/registration-test/nodes/n1"
    registration = Registration(client, key, b"first", ttl=5)
    try:
        await registration.start()
        lease = registration.lease_id
        assert await registration.update(b"second")
        found = await client.get(key)
        assert found is not None and found.value == b"second" and int(found.lease) == lease

        # Another process wrote the key (our lease was gone meanwhile): not ours
        # to overwrite, and the value waits for our next registration.
        other = await client.lease(30)
        await client.put(key, b"someone else", lease=other.id)
        assert not await registration.update(b"third")
        found = await client.get(key)
        assert found is not None and found.value == b"someone else"
        await client.revoke_lease(other.id)

        # Our lease gone too: the renewal registers again, with the latest value.
        assert lease is not None
        await client.revoke_lease(lease)
        await registration.renew_once(2.0)
        found = await client.get(key)
        assert found is not None and found.value == b"third"
        assert int(found.lease) == registration.lease_id != lease
    finally:
        await registration.close()
        await client.close()
