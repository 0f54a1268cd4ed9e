"""Token and spend budgets: prices, costs, and how a request's real usage is shared out.

Money is counted in integer nano-units of the price table's currency (1e-9 USD with the
default table), so that counters stay exact integers in SQLite and in Redis. A price is
given per 1,000,000 tokens (as providers publish it) and kept as integer micro-units per
1,000,000 tokens: `cost = ceil(tokens * price_micro / 1000)` nano-units, rounded up for
each task, so a recorded total never understates what was spent.

Caps hold exactly when reservations are upper bounds: `token_upper_bound` (UTF-8 bytes:
byte-level BPE tokenizers never make more tokens than bytes) for inputs, and the request's
`max_completion_tokens` for a chat answer. A smaller estimate is corrected by `settle` after
the call (the truth is recorded even when it overshoots, and admissions then wait).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation

import attrs

NANO = 10**9  # nano-units per currency unit
PER_TOKENS = 1_000_000  # prices are per this many tokens


@attrs.frozen
class ModelPrice:
    """Micro-units of currency per 1,000,000 tokens (2.00 USD/1M -> 2_000_000)."""

    input: int
    output: int = 0


# The default table: OpenAI list prices in USD per 1M tokens (standard tier; not batch, not
# cached input). Source: OpenAI's pricing page (platform.openai.com/docs/pricing), read from
# copies of it on 2026-12-02; o3 is at these prices since its price cut of 2025-06-10.
# Prices change: set MODEL_PRICES to the ones on your invoice.
DEFAULT_PRICES_DATE = "2026-12-02"
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "text-embedding-3-small": ModelPrice(20_000),  # 0.02
    "text-embedding-3-large": ModelPrice(130_000),  # 0.13
    "text-embedding-ada-002": ModelPrice(100_000),  # 0.10
    "o3": ModelPrice(2_000_000, 8_000_000),  # 2.00 in, 8.00 out
}


def parse_money(text: str | float | int) -> int:
    """`"5"`, `"0.02"`, `2.5` -> nano-units (exact for up to 9 decimals). Raises ValueError."""
    try:
        d = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError("an amount of money such as 5 or 12.50") from None
    if not d.is_finite() or d < 0:
        raise ValueError("an amount of money >= 0, such as 5 or 12.50")
    return math.ceil(d * NANO)


def parse_price(text: str | float | int) -> int:
    """A price per 1M tokens -> micro-units per 1M tokens (exact for up to 6 decimals;
    finer prices round up). Raises ValueError."""
    return math.ceil(Decimal(parse_money(text)) / 1000)


def format_money(nano: int) -> str:
    """Nano-units -> a decimal string with at most 9 decimals (`2500000000` -> `2.5`)."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    return f"{sign}{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else f"{sign}{whole}"


def cost(price: ModelPrice, tokens_in: int, tokens_out: int) -> int:
    """Nano-units for these tokens, rounded up."""
    micro_tokens = tokens_in * price.input + tokens_out * price.output  # micro-units * tokens / 1M
    return -(-micro_tokens // 1000)


def token_upper_bound(text: str) -> int:
    """Tokens an input can be at most (its UTF-8 bytes): reserve this for an exact cap."""
    return len(text.encode("utf-8", "surrogatepass"))


# Tokens a chat call may use beyond the UTF-8 bytes of its messages and answer schema (the
# chat format's framing: a few tokens per message, the reply's priming, the schema's wrapper).
CHAT_FRAMING = 64
# The answer budget reserved when CHAT_MAX_TOKENS is 0 (the model's own limit applies, which
# this cannot know): then the reservation is an estimate, not a bound.
UNBOUNDED_ANSWER = 32_768


def chat_bound(texts: Sequence[str], max_tokens: int) -> tuple[int, int]:
    """(tokens in, tokens out) one chat call can use at most: the UTF-8 bytes of what it
    sends (messages and answer schema) plus `CHAT_FRAMING`, and its answer budget
    (`UNBOUNDED_ANSWER` when `max_tokens` is 0)."""
    return sum(token_upper_bound(t) for t in texts) + CHAT_FRAMING, max_tokens if max_tokens > 0 else UNBOUNDED_ANSWER


def split(total: int, weights: Sequence[int]) -> list[int]:
    """`total` shared out in proportion to `weights` (equal shares when all are 0), in
    integers that add up to `total` exactly (largest remainders; ties go to the first)."""
    n = len(weights)
    if n == 0:
        return []
    if total < 0:
        raise ValueError("total must be >= 0")
    w = list(weights) if any(weights) else [1] * n
    s = sum(w)
    shares = [total * x // s for x in w]
    rest = total - sum(shares)
    order = sorted(range(n), key=lambda i: (-(total * w[i] % s), i))
    for i in order[:rest]:
        shares[i] += 1
    return shares
