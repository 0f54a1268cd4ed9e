"""Size requests to the backend's measured speed (one state per (backend, model)).

A backend's speed is unknown at start. A fast GPU server answers 64 texts in a fraction
of a second; a CPU server may need a second per 2,000-character text and computes one
request at a time, including requests the client has given up on. Fixed batch sizes,
requests in flight and timeouts cannot suit both: on the slow server a full batch passes
the timeout, the abandoned request is still computed, the next one waits behind it and
times out too.

So the controller starts with one small request (`cold_items`) in flight and the
configured timeout, measures, and then sizes from what it measured:

* **rate**: work per second as one request sees it (work = characters, at least one per
  item), an EWMA that falls faster than it rises. It includes the queueing the request met
  (a server computing one request at a time serves n requests in flight at 1/n each), so
  predictions made from it already account for the current concurrency. A timeout is
  evidence that the rate is lower than assumed: the rate drops to at most what the
  request proved (`work / elapsed`) and is halved once per round.
* **items per request**: at most what the rate predicts finishes in `target` seconds
  (`target * rate / chars per item`, and a character budget `target * rate` for texts of
  mixed length), and at most twice the largest request that succeeded within the target
  (so growth is multiplicative but always from a proven size). A timeout halves it, a busy
  answer stops its growth.
* **requests in flight**: one more per round while a request of the full MAX_BATCH_SIZE is
  predicted to take at most half the target (the batch size is not the bottleneck), one
  fewer per round when requests take longer than the target; halved (once per round) on a
  timeout or a busy answer. A *round* is the set of requests sent after the last change,
  so many answers of the same round change it only once (as TCP does per round trip).
* **timeout** for a request of a given size: `clamp(factor * expected + margin, floor,
  cap)` with `expected = work / rate`; the configured timeout (`cap`) while the speed is
  unknown, and again after `stale_after` seconds without any answer (the server may have
  unloaded the model), when requests in flight also drop to one until the next answer.

`target` is clamped so that `factor * target + margin` fits under `cap`: a request sized
for the target then always has a timeout well above its expected time.

Pure: every input (sizes, outcome, elapsed seconds, `now`) is passed in.
"""

from __future__ import annotations

import enum
import math

import attrs

MIN_ELAPSED = 1e-3  # seconds: an answer faster than this is measured as this
RATE_MIN = 1e-3  # work units per second
RATE_MAX = 1e12
MIN_TARGET = 0.05  # seconds
ALPHA_UP = 0.3  # EWMA weight of a sample above the estimate
ALPHA_DOWN = 0.6  # and below it: slow-downs are believed faster than speed-ups


class Outcome(enum.Enum):
    SUCCESS = "success"
    TIMEOUT = "timeout"  # no answer within the timeout; the server may still compute it
    BUSY = "busy"  # 503 / 429 / queue full: the server asks for less
    ERROR = "error"  # any other failure: says nothing about speed


@attrs.frozen
class Config:
    max_items: int  # MAX_BATCH_SIZE (and the adapter's own limit)
    max_in_flight: int  # CONCURRENCY_LIMIT
    timeout_cap: float  # the configured timeout of the backend (OLLAMA_TIMEOUT / OPENAI_TIMEOUT)
    target: float = 10.0  # seconds a request should take once the speed is known
    timeout_factor: float = 3.0
    timeout_margin: float = 5.0
    timeout_floor: float = 15.0
    cold_items: int = 2  # the first request's size
    stale_after: float = 120.0  # seconds without an answer after which the speed is re-checked

    def __attrs_post_init__(self) -> None:
        if self.max_items < 1 or self.max_in_flight < 1 or self.cold_items < 1:
            raise ValueError("max_items, max_in_flight and cold_items must be >= 1")
        for name in ("timeout_cap", "target", "timeout_factor", "timeout_margin", "timeout_floor", "stale_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.timeout_cap <= 0 or self.timeout_factor < 1:
            raise ValueError("timeout_cap must be > 0 and timeout_factor >= 1")


@attrs.frozen
class Observation:
    items: int  # texts in the request
    chars: int  # their characters (or estimated tokens: the same unit as the decision's budget)
    outcome: Outcome
    elapsed: float  # seconds from sending to the answer (or to giving up)
    now: float  # when it ended


@attrs.frozen
class State:
    rate: float | None = None  # work per second for one request; None: not measured yet
    per_item: float | None = None  # EWMA of characters per item (successful requests)
    growth_cap: int = 0  # items: twice the largest request proven within the target (0: cold)
    in_flight: int = 1
    changed_at: float = -math.inf  # when in_flight last changed: the start of the current round
    last_seen: float | None = None  # when the last answer (of any kind) came
    successes: int = 0
    timeouts: int = 0
    busy: int = 0


@attrs.frozen
class Decision:
    max_items: int  # items in the next request
    max_chars: float  # characters in the next request (inf while the speed is unknown)
    max_in_flight: int  # requests in flight
    measured: bool  # the speed has been measured (False: cold start or stale)


def initial(cfg: Config) -> State:
    return State(growth_cap=min(cfg.cold_items, cfg.max_items))


def work(items: int, chars: int) -> float:
    """The unit the rate counts: characters, at least one per item."""
    return float(max(chars, items, 1))


def target(cfg: Config) -> float:
    """Seconds a request is sized for: the configured target, lowered so that a request of
    that length gets a timeout (factor * target + margin) within the cap."""
    room = (cfg.timeout_cap - cfg.timeout_margin) / cfg.timeout_factor
    return max(MIN_TARGET, min(cfg.target, room))


def _clamp(x: float, lo: float, hi: float) -> float:
    if math.isnan(x):
        return lo
    return lo if x < lo else hi if x > hi else x


def _clean(obs: Observation) -> tuple[int, int, float, float]:
    items = max(1, int(obs.items))
    chars = max(0, int(obs.chars))
    elapsed = obs.elapsed if math.isfinite(obs.elapsed) and obs.elapsed > MIN_ELAPSED else MIN_ELAPSED
    now = obs.now if math.isfinite(obs.now) else 0.0
    return items, chars, elapsed, now


def _ewma(old: float | None, sample: float) -> float:
    if old is None:
        return sample
    alpha = ALPHA_UP if sample > old else ALPHA_DOWN
    return old + alpha * (sample - old)


def is_stale(cfg: Config, s: State, now: float) -> bool:
    return s.last_seen is not None and now - s.last_seen > cfg.stale_after


def observe(cfg: Config, s: State, obs: Observation) -> State:
    """Fold one request's outcome into the state."""
    items, chars, elapsed, now = _clean(obs)
    w = work(items, chars)
    sent_at = now - elapsed
    new_round = sent_at >= s.changed_at  # the request was sent at the current concurrency
    t = target(cfg)
    if obs.outcome is Outcome.SUCCESS:
        rate = _clamp(_ewma(s.rate, w / elapsed), RATE_MIN, RATE_MAX)
        per_item = _clamp(_ewma(s.per_item, chars / items), 0.0, RATE_MAX)
        growth = s.growth_cap
        if elapsed <= t:
            growth = max(growth, min(cfg.max_items, 2 * items))
        in_flight, changed_at = s.in_flight, s.changed_at
        full = cfg.max_items * max(per_item, 1.0) / rate  # predicted seconds of a full request
        if new_round and elapsed <= t / 2 and full <= t / 2 and in_flight < cfg.max_in_flight:
            in_flight, changed_at = in_flight + 1, now
        elif new_round and elapsed > t and in_flight > 1:
            in_flight, changed_at = in_flight - 1, now
        return attrs.evolve(
            s, rate=rate, per_item=per_item, growth_cap=growth, in_flight=in_flight, changed_at=changed_at,
            last_seen=now, successes=s.successes + 1,
        )
    if obs.outcome is Outcome.TIMEOUT:
        proven = _clamp(w / elapsed, RATE_MIN, RATE_MAX)  # it did not finish: the rate is at most this
        if s.rate is None:
            rate = proven
        else:
            rate = _clamp(min(s.rate * (0.5 if new_round else 1.0), proven), RATE_MIN, RATE_MAX)
        per_item = s.per_item if s.per_item is not None else chars / items
        growth = max(1, min(s.growth_cap, items // 2))
        in_flight, changed_at = s.in_flight, s.changed_at
        if is_stale(cfg, s, now):
            in_flight, changed_at = 1, now  # it was sent alone after a pause: stay alone
        elif new_round:
            in_flight, changed_at = max(1, s.in_flight // 2), now
        return attrs.evolve(
            s, rate=rate, per_item=per_item, growth_cap=growth, in_flight=in_flight, changed_at=changed_at,
            last_seen=now, timeouts=s.timeouts + 1,
        )
    if obs.outcome is Outcome.BUSY:
        growth = max(1, min(s.growth_cap, items))
        in_flight, changed_at = s.in_flight, s.changed_at
        if new_round:
            in_flight, changed_at = max(1, s.in_flight // 2), now
        return attrs.evolve(s, growth_cap=growth, in_flight=in_flight, changed_at=changed_at, last_seen=now, busy=s.busy + 1)
    return attrs.evolve(s, last_seen=now)


def decide(cfg: Config, s: State, now: float) -> Decision:
    """The limits for the next request."""
    stale = is_stale(cfg, s, now)
    items = max(1, s.growth_cap)
    max_chars = math.inf
    if s.rate is not None:
        budget = target(cfg) * s.rate
        per_item = max(s.per_item if s.per_item is not None else 1.0, 1.0)
        items = min(items, int(_clamp(budget / per_item, 1.0, float(cfg.max_items))))
        max_chars = max(1.0, budget)
    in_flight = 1 if stale or s.rate is None else s.in_flight
    return Decision(
        max_items=int(_clamp(items, 1, cfg.max_items)),
        max_chars=max_chars,
        max_in_flight=int(_clamp(in_flight, 1, cfg.max_in_flight)),
        measured=s.rate is not None and not stale,
    )


def expected_seconds(cfg: Config, s: State, items: int, chars: int) -> float | None:
    """Predicted duration of a request of this size (None while the speed is unknown)."""
    if s.rate is None:
        return None
    return work(max(1, items), max(0, chars)) / s.rate


def timeout_for(cfg: Config, s: State, items: int, chars: int, now: float) -> float:
    """Seconds to wait for a request of `items` texts of `chars` characters in all."""
    expected = expected_seconds(cfg, s, items, chars)
    if expected is None or is_stale(cfg, s, now):
        return cfg.timeout_cap
    floor = min(cfg.timeout_floor, cfg.timeout_cap)
    return _clamp(cfg.timeout_factor * expected + cfg.timeout_margin, floor, cfg.timeout_cap)


def items_per_second(cfg: Config, s: State) -> float | None:
    """Estimated throughput in items per second at the current concurrency (None: unknown).

    For intake: claiming much more than this times a horizon only makes tasks wait
    `in_progress`."""
    if s.rate is None:
        return None
    per_item = max(s.per_item if s.per_item is not None else 1.0, 1.0)
    return s.rate / per_item * s.in_flight
