"""``python -m coordinator``: run one Mesh coordinator until SIGTERM or SIGINT."""

from __future__ import annotations

from common.process import run_until_signalled
from coordinator.config import parse_args
from coordinator.server import serve


def main() -> None:
    config = parse_args()
    run_until_signalled(lambda stop: serve(config, stop), log_level=config.log_level,
                        log_format=config.log_format, loop=config.event_loop)


if __name__ == "__main__":
    main()
