"""Job ids that route: ``{tag}`` + base-36 epoch + ``-`` + base-36 seq (+ ``.`` +
base-36 index for the second and later jobs of one command).

The tag hashes to the slot of the job's queue, so a call that names only a job
id (GetJob, Complete, ...) reaches the queue's group with the ordinary slot
function. The tag is the queue's own hash part when it is short and plain
(``{mail}3-1f``), else a short string found to hash to the same slot. The
(epoch, seq) of the command that enqueued the job is unique in its group's
history, failovers included, so every copy makes the same id by itself.
"""

from __future__ import annotations

import itertools
import string

from common.slots import hash_part, slot_for

__all__ = ["job_id", "slot_tag"]

_ALPHABET = string.digits + string.ascii_lowercase
_TAG_ALPHABET = string.digits + string.ascii_letters + "-_"
_MAX_TAG = 32
_tags: dict[int, str] = {}


def _base36(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def slot_tag(slot: int) -> str:
    """The first string (shortest, in a fixed order) whose slot is ``slot``: the
    same on every node. Found by search (~16k hashes) once per slot."""
    tag = _tags.get(slot)
    if tag is not None:
        return tag
    for length in itertools.count(1):
        for chars in itertools.product(_TAG_ALPHABET, repeat=length):
            candidate = "".join(chars)
            if slot_for(candidate) == slot:
                _tags[slot] = candidate
                return candidate
    raise AssertionError("unreachable: every slot has a tag")


def queue_tag(queue: str) -> str:
    part = hash_part(queue.encode()).decode(errors="replace")
    if len(part) <= _MAX_TAG and "}" not in part and "{" not in part:
        return part
    return slot_tag(slot_for(queue))


def job_id(queue: str, epoch: int, seq: int, index: int = 0) -> str:
    """The id of the ``index``-th job enqueued into ``queue`` by command ``(epoch,
    seq)`` (a command of several jobs numbers them: ``.1``, ``.2``, ...)."""
    base = f"{{{queue_tag(queue)}}}{_base36(epoch)}-{_base36(seq)}"
    return f"{base}.{_base36(index)}" if index else base
