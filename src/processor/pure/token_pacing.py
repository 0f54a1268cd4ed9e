"""Token-aware pacing for OpenAI, driven by what the server says (CONTRACT.md §3, §7).

Every OpenAI answer carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: how
much of the per-minute budget (per model) is left, and how long until it is whole again.
The pacer spends what remains at once; when a request does not fit it waits until the
reset the server announced, or earlier, when what this process itself spent leaves the
minute (a sliding minute frees each request's tokens 60 s after it was sent; a token
bucket refills at least as fast). It never plans past what the server said remains.

* Before the first answer nothing is known: one request goes, the others wait for it.
* A request's tokens are estimated before it is sent (a quarter of the characters, times
  a per-model correction learnt from `usage`, plus a token per input; chat adds the
  expected completion, also learnt) and reserved. Requests still in flight when an answer
  arrives are counted against the remaining it announces (the server may not have
  counted them yet).
* A server that sends no `x-ratelimit-*` headers is not paced.
* A 429's `retry-after` holds every request of that model until it has passed.

No I/O, no clock: `now` is an argument (trio time in the shell); state in, state out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import attrs

WINDOW = 60.0  # OpenAI's limits are per minute
CHARS_PER_TOKEN = 4.0  # the rule of thumb; corrected per model from usage
SAFETY = 1.05  # estimates sit this much above the learnt ratio
LEARN_RATE = 0.3  # weight of the newest usage observation
MIN_RATIO, MAX_RATIO = 0.05, 20.0
DEFAULT_COMPLETION = 256  # expected completion tokens of a chat request before any usage
ASK_AGAIN = 1.0  # seconds to wait (or until an answer comes) when nothing better is known
_RESET = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def parse_reset(value: str | None) -> float | None:
    """`x-ratelimit-reset-*` values look like `1s`, `6m0s`, `120ms`, `1h2m3.5s`, or plain seconds."""
    if not value:
        return None
    text = value.strip()
    m = _RESET.match(text)
    if not m or not any(m.groups()):
        try:
            seconds = float(text)
        except ValueError:
            return None
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


@attrs.frozen
class Budget:
    """One per-minute budget (requests or tokens) as the server last described it."""

    limit: int
    remaining: float  # at `seen_at`, less what was in flight then and what was reserved since
    reset_at: float  # when the server said it is whole again
    seen_at: float


@attrs.frozen
class Sent:
    """A request this process sent: when, and what it is charged (estimate, then usage)."""

    seq: int
    at: float  # sent
    tokens: int
    done: float | None = None  # answered (or given up): the server charged it between `at` and this


@attrs.frozen
class Decision:
    wait: float  # 0: go now (reserved as `seq`); else seconds until it may fit: ask again then
    reason: str  # "go", "first_answer", "tokens", "requests", "retry_after"
    seq: int = -1


@attrs.frozen
class Pacer:
    """The pacing state of one model on one account."""

    answered: bool = False  # an answer (any status) came back at least once
    tokens: Budget | None = None  # None: the server announced no such budget
    requests: Budget | None = None
    sent: tuple[Sent, ...] = ()  # this process's requests of the last WINDOW seconds
    in_flight: tuple[int, ...] = ()  # seqs sent and not yet answered
    next_seq: int = 0
    blocked_until: float = 0.0  # a 429's retry-after
    ratio: float = 1.0  # usage / (chars / 4), learnt
    completion: float = float(DEFAULT_COMPLETION)  # expected completion tokens (chat), learnt
    learnt: int = 0  # usage observations so far


def available(b: Budget, sent: tuple[Sent, ...], at: float, *, tokens: bool) -> float:
    """What the budget holds at time `at` (>= seen_at): the remaining announced, plus what
    this process sent that has left the minute since. Past the reset it is whole, less
    what this process sent that the announcement did not cover (answered after it, or not
    yet) and that may still be within the server's minute."""
    if at >= b.reset_at:
        recent = sum((s.tokens if tokens else 1) for s in sent
                     if s.done is None or (s.done > b.seen_at and s.done + WINDOW > at))
        return max(0.0, float(b.limit) - recent)
    freed = sum((s.tokens if tokens else 1) for s in sent if _freed_by(b, s, at))
    return min(float(b.limit), b.remaining + freed)


def _freed_by(b: Budget, s: Sent, at: float) -> bool:
    """Counted as used in the announcement (not yet a minute old when it was taken), and
    surely out of the server's minute by `at` (a minute after its answer)."""
    return s.done is not None and s.at + WINDOW > b.seen_at and s.done + WINDOW <= at


def _fits_at(b: Budget, sent: tuple[Sent, ...], now: float, need: float, *, tokens: bool) -> float:
    """The earliest time >= now at which `need` fits (at the latest the reset)."""
    if available(b, sent, now, tokens=tokens) >= need:
        return now
    for t in sorted(s.done + WINDOW for s in sent if s.done is not None):
        if t > now and t < b.reset_at and available(b, sent, t, tokens=tokens) >= need:
            return t
    if b.reset_at > now:
        return b.reset_at
    # past the reset and still short: requests of this process in flight hold the rest
    # (each frees a minute after its answer); look again when an answer comes
    later = [s.done + WINDOW for s in sent if s.done is not None and s.done + WINDOW > now]
    return min([*later, now + ASK_AGAIN])


def decide(p: Pacer, now: float, tokens: int) -> tuple[Pacer, Decision]:
    """May a request estimated at `tokens` go at `now`? Going reserves it."""
    if now < p.blocked_until:
        return p, Decision(p.blocked_until - now, "retry_after")
    if not p.answered:
        if not p.in_flight:
            return _reserve(p, now, tokens)
        return p, Decision(ASK_AGAIN, "first_answer")
    when, reason = now, "go"
    if p.tokens is not None:
        need = min(float(tokens), float(p.tokens.limit))  # larger than the whole budget: goes when it is whole
        t = _fits_at(p.tokens, p.sent, now, need, tokens=True)
        if t > when:
            when, reason = t, "tokens"
    if p.requests is not None:
        t = _fits_at(p.requests, p.sent, now, 1.0, tokens=False)
        if t > when:
            when, reason = t, "requests"
    if when <= now:
        return _reserve(p, now, tokens)
    return p, Decision(when - now, reason)


def _reserve(p: Pacer, now: float, tokens: int) -> tuple[Pacer, Decision]:
    t, r = p.tokens, p.requests
    keep = tuple(s for s in p.sent if s.done is None or s.done + WINDOW > now)
    if t is not None and now >= t.reset_at:  # past an announced reset: a new minute
        t = Budget(t.limit, available(t, keep, now, tokens=True), now + WINDOW, now)
    if r is not None and now >= r.reset_at:
        r = Budget(r.limit, available(r, keep, now, tokens=False), now + WINDOW, now)
    seq = p.next_seq
    p = attrs.evolve(
        p,
        tokens=None if t is None else attrs.evolve(t, remaining=t.remaining - tokens),
        requests=None if r is None else attrs.evolve(r, remaining=r.remaining - 1),
        sent=(*keep, Sent(seq, now, tokens)),
        in_flight=(*p.in_flight, seq),
        next_seq=seq + 1,
    )
    return p, Decision(0.0, "go", seq)


def _int(value: str | None) -> int | None:
    try:
        n = int(str(value).strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def _budget(headers: Mapping[str, str], kind: str, now: float, in_flight: float) -> Budget | None:
    limit = _int(headers.get(f"x-ratelimit-limit-{kind}"))
    remaining = _int(headers.get(f"x-ratelimit-remaining-{kind}"))
    if limit is None or remaining is None or limit <= 0:
        return None
    reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
    reset_at = now + (WINDOW if reset is None else min(reset, WINDOW))  # a minute at most
    return Budget(limit, float(min(remaining, limit)) - in_flight, reset_at, now)


def settle(
    p: Pacer, now: float, headers: Mapping[str, str], *, seq: int, used: int | None = None,
    retry_after: float | None = None,
) -> Pacer:
    """The answer to request `seq` came back (any status): take the budgets its headers
    announce; `used` is what the server charged (usage), when it said; a request it
    refused (429) is charged nothing."""
    in_flight = tuple(s for s in p.in_flight if s != seq)
    sent = tuple(attrs.evolve(s, done=now, tokens=s.tokens if used is None else max(0, used)) if s.seq == seq else s
                 for s in p.sent)
    others = [s for s in sent if s.seq in in_flight]
    tokens = _budget(headers, "tokens", now, float(sum(s.tokens for s in others)))
    requests = _budget(headers, "requests", now, float(len(others)))
    blocked = p.blocked_until
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        blocked = max(blocked, now + min(retry_after, WINDOW))
    return attrs.evolve(
        p, answered=True, tokens=tokens, requests=requests, sent=sent, in_flight=in_flight, blocked_until=blocked,
    )


def cancel(p: Pacer, now: float, *, seq: int) -> Pacer:
    """No answer came (timeout, connection error): the request stays counted as sent
    (the server may have charged it); it is no longer in flight."""
    sent = tuple(attrs.evolve(s, done=now) if s.seq == seq else s for s in p.sent)
    return attrs.evolve(p, sent=sent, in_flight=tuple(s for s in p.in_flight if s != seq))


def estimate(p: Pacer, chars: int, *, items: int = 1, chat: bool = False) -> int:
    """Tokens a request of `chars` characters over `items` inputs will be charged,
    estimated on the high side; chat adds the expected completion."""
    prompt = chars / CHARS_PER_TOKEN * p.ratio * SAFETY + items
    return max(1, math.ceil(prompt + (p.completion * SAFETY if chat else 0.0)))


def learn(p: Pacer, chars: int, prompt_tokens: int | None, completion_tokens: int | None = None) -> Pacer:
    """Correct the per-model ratio (and the expected completion) from a request's usage."""
    ratio, completion = p.ratio, p.completion
    if prompt_tokens is not None and prompt_tokens > 0 and chars > 0:
        observed = min(MAX_RATIO, max(MIN_RATIO, prompt_tokens / (chars / CHARS_PER_TOKEN)))
        ratio = observed if p.learnt == 0 else (1 - LEARN_RATE) * ratio + LEARN_RATE * observed
        ratio = max(ratio, observed * 0.9)  # never far below the newest observation
    if completion_tokens is not None and completion_tokens >= 0:
        completion = (1 - LEARN_RATE) * completion + LEARN_RATE * completion_tokens
        completion = max(completion, completion_tokens * 0.9)
    return attrs.evolve(p, ratio=ratio, completion=completion, learnt=p.learnt + 1)
