"""``python -m nodes``: run one Mesh node until SIGTERM or SIGINT."""

from __future__ import annotations

import gc

from common.process import run_until_signalled
from nodes.config import parse_args
from nodes.server import serve

FULL_COLLECTION_EVERY = 1000
"""Second-generation collections between two full ones (CPython's default: 10).

A node's data lives in a few large maps of entries the garbage collector does
not track (cache entries, events, finished jobs, notifications: plain tuples).
A full collection still walks each map, a million references for a million
keys: 60-150 ms with the loop held. And CPython's own brake on full collections
(wait until the tracked long-lived objects grew by a quarter) counts only
tracked objects, of which a node has few: under writes to a big cache, one ran
every 1.2 s. At most one every thousand second-generation collections (about
seven million allocations) keeps them rare; the young generations, where
nearly all cyclic garbage dies, are collected as often as before."""


def main() -> None:
    config = parse_args()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    run_until_signalled(lambda stop: serve(config, stop), log_level=config.log_level,
                        log_format=config.log_format, loop=config.event_loop)


if __name__ == "__main__":
    main()
