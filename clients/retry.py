"""Exponential backoff with full jitter, bounded by the call's deadline."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays of ``initial * multiplier**n``, capped at ``maximum``, each drawn at random
    from [0, delay] so that clients retrying together spread out ("full jitter")."""

    initial: float = 0.05
    maximum: float = 1.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.maximum, self.initial * self.multiplier**attempt))
