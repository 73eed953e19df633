"""Key -> slot mapping shared by every process (the Redis Cluster scheme).

slot = CRC16-XMODEM(key) mod 16384, where only the part inside the first
non-empty ``{...}`` is hashed if there is one, so ``{user:1}:cart`` and
``{user:1}:profile`` always share a slot.
"""

from __future__ import annotations

SLOT_COUNT = 16384


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _make_table()


def crc16_xmodem(data: bytes) -> int:
    """CRC16-XMODEM (poly 0x1021, init 0): crc16(b"123456789") == 0x31C3."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_part(key: bytes) -> bytes:
    """The bytes that decide the slot: the first non-empty {tag}, else the whole key."""
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
