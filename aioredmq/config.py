"""Small configuration value objects. Units are in the names; every value is checked here."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ("RetryPolicy", "check_positive")


def check_positive(knob: str, value: float, *, integer: bool = False, zero: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``knob`` unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{knob}={value!r} must be a finite number")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{knob}={value!r} must be a whole number")
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{knob}={value!r} must be {'>= 0' if zero else '> 0'}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed deliveries are retried.

    A message is delivered at most ``max_deliveries`` times; after that failure it goes
    to dead-letter with the reason. Between tries it waits an exponential backoff,
    ``backoff_initial_s * backoff_multiplier ** (deliveries - 1)`` capped at
    ``backoff_max_s``, with "equal jitter": a random value between half and all of it.
    """

    max_deliveries: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        check_positive("max_deliveries", self.max_deliveries, integer=True)
        check_positive("backoff_initial_s", self.backoff_initial_s, zero=True)
        check_positive("backoff_max_s", self.backoff_max_s, zero=True)
        check_positive("backoff_multiplier", self.backoff_multiplier)
        if self.backoff_multiplier < 1:
            raise ConfigError(f"backoff_multiplier={self.backoff_multiplier!r} must be >= 1")

    def backoff_s(self, deliveries: int) -> float:
        """The wait before the next delivery, after ``deliveries`` failed deliveries."""
        exponent = min(max(deliveries - 1, 0), 64)
        base = min(self.backoff_max_s, self.backoff_initial_s * self.backoff_multiplier**exponent)
        return base / 2 + random.random() * base / 2
