"""``python -m coordinator``: run one Mesh coordinator until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from coordinator.config import parse_args
from coordinator.server import serve


async def _main() -> None:
    config = parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_main())


if __name__ == "__main__":
    main()
