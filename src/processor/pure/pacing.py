"""When to poll next, and when to refresh the access token."""

from __future__ import annotations

import enum
import math

# A token without `expires_in` is assumed to live this long (and is refreshed on 401).
DEFAULT_TOKEN_LIFETIME = 300.0
TOKEN_LEEWAY = 60.0
POLL_JITTER = 0.1


class PollOutcome(enum.Enum):
    NEW_WORK = "new_work"  # at least one task this worker can take
    NOTHING_NEW = "nothing_new"  # empty, or only tasks it skips or already holds


def poll_delay(outcome: PollOutcome, interval: float, draw: float) -> float:
    """Seconds to wait before the next poll; `draw` is uniform in [0, 1).

    After new work: poll again as soon as there is room (0). After nothing new: the idle
    interval with +/-10 % jitter so that replicas spread out.
    """
    if outcome is PollOutcome.NEW_WORK:
        return 0.0
    return interval * (1.0 - POLL_JITTER + 2 * POLL_JITTER * draw)


def token_refresh_at(obtained_at: float, expires_in: float | None, leeway: float = TOKEN_LEEWAY) -> float:
    """When a token obtained at `obtained_at` should be replaced.

    `leeway` before expiry, or a tenth of its life for short-lived tokens: one token request
    per lifetime, never a request sent with a token about to expire. (A token revoked early
    is caught by the 401 path.)
    """
    usable = expires_in is not None and math.isfinite(expires_in) and expires_in >= 1.0  # NaN, inf, < 1 s: missing
    lifetime = DEFAULT_TOKEN_LIFETIME if expires_in is None or not usable else expires_in
    return obtained_at + lifetime - min(leeway, lifetime * 0.1)
