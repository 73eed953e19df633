"""Key -> slot mapping shared by every process (the Redis Cluster scheme).

slot = CRC16-XMODEM(key) mod 16384, where only the part inside the first
non-empty ``{...}`` is hashed if there is one, so ``{user:1}:cart`` and
``{user:1}:profile`` always share a slot. A tenant's stored names start with
the tenant and a 0x1F separator (`common.tenancy`); only what follows it is
hashed, so a name has the same slot for every tenant.
"""

from __future__ import annotations

import binascii

SLOT_COUNT = 16384


def crc16_xmodem(data: bytes) -> int:
    """CRC16-XMODEM (poly 0x1021, init 0): crc16(b"123456789") == 0x31C3."""
    # binascii.crc_hqx is this exact CRC (CRC-CCITT, poly 0x1021) computed in C;
    # with an initial value of 0 it is XMODEM, several times faster than a Python loop.
    return binascii.crc_hqx(data, 0)


def hash_part(key: bytes) -> bytes:
    """The bytes that decide the slot: the first non-empty {tag}, else the whole key
    (without its tenant part)."""
    tenant_end = key.find(b"\x1f")
    if tenant_end != -1:
        key = key[tenant_end + 1 :]
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def slot_for(key: str | bytes) -> int:
    """The slot (0..16383) that owns ``key``."""
    raw = key.encode() if isinstance(key, str) else key
    return crc16_xmodem(hash_part(raw)) % SLOT_COUNT
