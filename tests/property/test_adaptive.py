"""The adaptive controller's decisions hold for any observations, and converge on steady
backends (a discrete-event model of a serial slow server and a parallel fast one)."""

from __future__ import annotations

import heapq
import math

import attrs
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from processor.pure import adaptive as ad
from processor.pure.adaptive import Outcome

configs = st.builds(
    ad.Config,
    max_items=st.integers(1, 256),
    max_in_flight=st.integers(1, 16),
    timeout_cap=st.floats(0.5, 600),
    target=st.floats(0.1, 60),
    timeout_factor=st.floats(1, 5),
    timeout_margin=st.floats(0, 20),
    timeout_floor=st.floats(0, 60),
    cold_items=st.integers(1, 8),
    stale_after=st.floats(1, 1000),
)

weird = st.floats(allow_nan=True, allow_infinity=True)
observations = st.tuples(
    st.integers(-3, 10_000),  # items
    st.integers(-10, 10**9),  # chars
    st.sampled_from(list(Outcome)),
    st.one_of(st.floats(0, 1000), weird),  # elapsed
    st.floats(0, 5000),  # time since the previous observation
)


def check_decision(cfg: ad.Config, s: ad.State, now: float) -> ad.Decision:
    d = ad.decide(cfg, s, now)
    assert 1 <= d.max_items <= cfg.max_items
    assert 1 <= d.max_in_flight <= cfg.max_in_flight
    assert d.max_chars > 0 and not math.isnan(d.max_chars)
    if not d.measured:
        assert d.max_in_flight == 1
    for items, chars in ((1, 0), (d.max_items, 10**6), (10**6, 10**12)):
        t = ad.timeout_for(cfg, s, items, chars, now)
        assert min(cfg.timeout_floor, cfg.timeout_cap) <= t <= cfg.timeout_cap
    if s.rate is not None:
        assert ad.RATE_MIN <= s.rate <= ad.RATE_MAX
    return d


@settings(max_examples=300)
@given(cfg=configs, obs=st.lists(observations, max_size=40))
def test_decisions_stay_within_bounds(cfg, obs):
    s = ad.initial(cfg)
    now = 0.0
    d = check_decision(cfg, s, now)
    assert d.max_in_flight == 1 and d.max_items <= cfg.cold_items  # cold: one small request
    assert ad.timeout_for(cfg, s, 1, 1, now) == cfg.timeout_cap  # unknown speed: the configured timeout
    for items, chars, outcome, elapsed, dt in obs:
        now += dt
        s = ad.observe(cfg, s, ad.Observation(items, chars, outcome, elapsed, now))
        check_decision(cfg, s, now)
        check_decision(cfg, s, now + cfg.stale_after + 1)


@settings(max_examples=300)
@given(cfg=configs, obs=st.lists(observations, max_size=30), size=st.integers(1, 256), chars_per=st.integers(0, 5000),
       elapsed=st.floats(0, 600), dt=st.floats(0, 2000))
def test_after_a_timeout_the_next_request_is_not_larger(cfg, obs, size, chars_per, elapsed, dt):
    s = ad.initial(cfg)
    now = 0.0
    for items, chars, outcome, e, d in obs:
        now += d
        s = ad.observe(cfg, s, ad.Observation(items, chars, outcome, e, now))
    now += dt
    before = ad.decide(cfg, s, now)
    items = min(size, before.max_items)  # a request sent within the decision
    t_before = ad.timeout_for(cfg, s, items, items * chars_per, now)
    after_state = ad.observe(cfg, s, ad.Observation(items, items * chars_per, Outcome.TIMEOUT, elapsed, now))
    after = ad.decide(cfg, after_state, now)
    assert after.max_items <= before.max_items
    assert after.max_items <= max(1, items // 2)
    assert after.max_chars <= before.max_chars
    assert after.max_in_flight <= before.max_in_flight
    if before.measured:
        # slower than assumed: the same request now gets at least as much time
        assert ad.timeout_for(cfg, after_state, items, items * chars_per, now) >= t_before


@settings(max_examples=200)
@given(cfg=configs, obs=st.lists(observations, max_size=30), size=st.integers(1, 256))
def test_busy_halves_requests_in_flight_and_stops_growth(cfg, obs, size):
    s = ad.initial(cfg)
    now = 0.0
    for items, chars, outcome, e, d in obs:
        now += d
        s = ad.observe(cfg, s, ad.Observation(items, chars, outcome, e, now))
    now += 1.0
    before = ad.decide(cfg, s, now)
    items = min(size, before.max_items)
    after = ad.decide(cfg, ad.observe(cfg, s, ad.Observation(items, items * 100, Outcome.BUSY, 0.5, now)), now)
    assert after.max_items <= before.max_items
    assert after.max_in_flight <= max(1, before.max_in_flight)


@settings(max_examples=200)
@given(cfg=configs, obs=st.lists(observations, max_size=20), answers=st.lists(st.sampled_from(list(Outcome)), min_size=2, max_size=12),
       latency=st.floats(0.001, 5))
def test_answers_of_one_round_change_requests_in_flight_at_most_once(cfg, obs, answers, latency):
    """Requests sent together (one round) move the concurrency by one step, not one per answer."""
    s = ad.initial(cfg)
    now = 0.0
    for items, chars, outcome, e, d in obs:
        now += d
        s = ad.observe(cfg, s, ad.Observation(items, chars, outcome, e, now))
    now += 1.0
    sent_at = now
    d = ad.decide(cfg, s, now)
    n0 = s.in_flight
    for i, outcome in enumerate(answers):
        end = sent_at + latency + i * 1e-3
        s = ad.observe(cfg, s, ad.Observation(d.max_items, d.max_items * 50, outcome, end - sent_at, end))
    # one step up (+1), one down (-1), or one cut (halving), never compounded
    assert s.in_flight in {n0, n0 + 1, n0 - 1, max(1, n0 // 2), 1}


# -- a discrete-event model of a backend ------------------------------------------------------


def request_size(d: ad.Decision, text_chars: int) -> int:
    """Texts of `text_chars` each in the largest request the decision allows (at least one)."""
    by_chars = d.max_items if math.isinf(d.max_chars) else int(d.max_chars // max(text_chars, 1))
    return max(1, min(d.max_items, by_chars))


@attrs.define
class Run:
    timeouts: int = 0
    requests: int = 0
    done: int = 0
    end: float = 0.0
    decisions: list[tuple[float, ad.Decision, ad.State]] = attrs.field(factory=list)
    abandoned: dict[int, int] = attrs.field(factory=dict)


def simulate(cfg: ad.Config, *, texts: int, text_chars: int, seconds_per_char: float, base: float = 0.0,
             serial: bool, max_requests: int = 2000) -> Run:
    """Drive the controller against a server that answers a request of c characters in
    `base + c * seconds_per_char` seconds; a `serial` one computes one request at a time in
    arrival order, including requests the client has given up on."""
    s = ad.initial(cfg)
    run = Run()
    now = 0.0
    busy_until = 0.0
    pool = list(range(texts))
    out: list[tuple[float, int, bool, list[int], float]] = []  # (end, seq, timed_out, ids, sent_at)
    seq = 0
    while (pool or out) and run.requests < max_requests:
        d = ad.decide(cfg, s, now)
        run.decisions.append((now, d, s))
        while pool and len(out) < d.max_in_flight:
            k = min(request_size(d, text_chars), len(pool))
            ids, pool = pool[:k], pool[k:]
            chars = k * text_chars
            service = base + chars * seconds_per_char
            if serial:
                done_at = max(now, busy_until) + service
                busy_until = done_at
            else:
                done_at = now + service
            timeout = ad.timeout_for(cfg, s, k, chars, now)
            timed_out = done_at - now > timeout
            heapq.heappush(out, (now + timeout if timed_out else done_at, seq, timed_out, ids, now))
            seq += 1
            run.requests += 1
        end, _, timed_out, ids, sent_at = heapq.heappop(out)
        now = end
        outcome = Outcome.TIMEOUT if timed_out else Outcome.SUCCESS
        s = ad.observe(cfg, s, ad.Observation(len(ids), len(ids) * text_chars, outcome, now - sent_at, now))
        if timed_out:
            run.timeouts += 1
            for i in ids:
                run.abandoned[i] = run.abandoned.get(i, 0) + 1
            pool = ids + pool
        else:
            run.done += len(ids)
    run.end = now
    return run


@settings(max_examples=150, deadline=None)
@given(max_items=st.integers(1, 128), max_in_flight=st.integers(1, 8), cap=st.floats(30, 300),
       base=st.floats(0, 0.5), text_chars=st.integers(1, 4000))
def test_a_steady_fast_backend_reaches_the_maxima(max_items, max_in_flight, cap, base, text_chars):
    cfg = ad.Config(max_items=max_items, max_in_flight=max_in_flight, timeout_cap=cap)
    # fast: a full request in at most a tenth of the target (a GPU server, the mock)
    seconds_per_char = 0.1 * ad.target(cfg) / (max_items * text_chars) / 2
    assume(base <= 0.05 * ad.target(cfg))
    run = simulate(cfg, texts=max_items * max_in_flight * 40, text_chars=text_chars,
                   seconds_per_char=seconds_per_char, base=base, serial=False)
    assert run.timeouts == 0
    reached = [i for i, (_, d, _) in enumerate(run.decisions) if (d.max_items, d.max_in_flight) == (max_items, max_in_flight)]
    assert reached, "never reached MAX_BATCH_SIZE and CONCURRENCY_LIMIT"
    # quickly: within a few rounds of doubling and adding (a round has at most max_in_flight answers)
    rounds = math.ceil(math.log2(max_items)) + max_in_flight + 2
    assert reached[0] <= rounds * max_in_flight
    # and it stays there
    assert all((d.max_items, d.max_in_flight) == (max_items, max_in_flight) for _, d, _ in run.decisions[reached[0]:])


@settings(max_examples=150, deadline=None)
@given(max_items=st.integers(1, 128), max_in_flight=st.integers(1, 8), cap=st.floats(30, 300),
       text_chars=st.integers(100, 4000), seconds_per_text=st.floats(0.01, 1.0), serial=st.booleans())
def test_on_a_steady_slow_backend_a_full_request_fits_its_timeout(max_items, max_in_flight, cap, text_chars, seconds_per_text, serial):
    cfg = ad.Config(max_items=max_items, max_in_flight=max_in_flight, timeout_cap=cap)
    seconds_per_text *= ad.target(cfg) / 2  # one text takes at most half the target
    seconds_per_char = seconds_per_text / text_chars
    run = simulate(cfg, texts=300, text_chars=text_chars, seconds_per_char=seconds_per_char, serial=serial)
    assert run.done == 300
    assert run.timeouts == 0
    for now, d, s in run.decisions:
        if not d.measured:
            continue
        k = request_size(d, text_chars)
        # the true time of the largest request allowed, with every slot busy on a serial server
        true = k * seconds_per_text * (d.max_in_flight if serial else 1)
        assert true < ad.timeout_for(cfg, s, k, k * text_chars, now)


def test_the_slow_cpu_server_of_issue_11():
    """1 s per 2,000-character text, one request at a time, abandoned requests computed;
    MAX_BATCH_SIZE=64, CONCURRENCY_LIMIT=5, OPENAI_TIMEOUT=60 (the defaults)."""
    cfg = ad.Config(max_items=64, max_in_flight=5, timeout_cap=60.0)
    run = simulate(cfg, texts=128, text_chars=2000, seconds_per_char=1 / 2000, serial=True)
    assert run.done == 128 and run.timeouts == 0
    assert run.end < 128 * 1.0 * 1.15  # within 15 % of the server's own speed
    final = run.decisions[-1][1]
    assert final.max_in_flight == 1 and 5 <= final.max_items <= 15  # requests of 5–15 s


def test_fixed_defaults_against_the_slow_server_pile_up_timeouts():
    """The model reproduces the defect: 64 texts x 5 in flight at a 63.2 s timeout."""
    timeouts = 0
    busy_until = 0.0
    now = 0.0
    for _ in range(5):
        busy_until = max(now, busy_until) + 64.0
        timeouts += busy_until - now > 63.2
    assert timeouts == 5


@given(cfg=configs)
def test_a_pause_longer_than_stale_after_goes_back_to_one_request_and_the_cap(cfg):
    s = ad.initial(cfg)
    now = 0.0
    for _ in range(30):
        d = ad.decide(cfg, s, now)
        now += 0.01
        s = ad.observe(cfg, s, ad.Observation(d.max_items, d.max_items * 10, Outcome.SUCCESS, 0.01, now))
    later = now + cfg.stale_after + 1
    d = ad.decide(cfg, s, later)
    assert d.max_in_flight == 1 and not d.measured
    assert ad.timeout_for(cfg, s, d.max_items, d.max_items * 10, later) == cfg.timeout_cap


# -- what the shell relies on ------------------------------------------------------------------


def _fold(cfg: ad.Config, obs) -> tuple[ad.State, float]:
    s = ad.initial(cfg)
    now = 0.0
    for items, chars, outcome, e, d in obs:
        now += d
        s = ad.observe(cfg, s, ad.Observation(items, chars, outcome, e, now))
    return s, now


sized_observations = st.tuples(
    st.integers(-3, 300),  # items: about the decisions' sizes
    st.integers(-10, 10**6),
    st.sampled_from(list(Outcome)),
    st.one_of(st.floats(0, 30), weird),
    st.floats(0, 200),
)


@settings(max_examples=300)
@given(cfg=configs, obs=st.lists(sized_observations, max_size=40))
def test_requests_grow_only_from_a_size_that_was_proven(cfg, obs):
    """At most twice the largest request that succeeded within the target (or the cold size):
    the daemon never jumps from two texts to MAX_BATCH_SIZE on a guess."""
    s = ad.initial(cfg)
    now = 0.0
    proven = min(cfg.cold_items, cfg.max_items)
    for items, chars, outcome, e, d in obs:
        now += d
        s = ad.observe(cfg, s, ad.Observation(items, chars, outcome, e, now))
        elapsed = e if math.isfinite(e) and e > ad.MIN_ELAPSED else ad.MIN_ELAPSED
        if outcome is Outcome.SUCCESS and elapsed <= ad.target(cfg):
            proven = max(proven, min(cfg.max_items, 2 * max(1, items)))
        assert ad.decide(cfg, s, now).max_items <= max(1, proven)


@settings(max_examples=300)
@given(cfg=configs, obs=st.lists(st.tuples(st.integers(-3, 10_000), st.integers(-10, 10**9),
                                           st.sampled_from([Outcome.BUSY, Outcome.ERROR]),
                                           st.one_of(st.floats(0, 1000), weird), st.floats(0, 5000)), max_size=30))
def test_busy_and_other_errors_measure_nothing(cfg, obs):
    """Only an answer (or a timeout, which bounds the speed) measures: until then one request
    at a time, the configured timeout, no character budget."""
    s, now = _fold(cfg, obs)
    d = ad.decide(cfg, s, now)
    assert s.rate is None and not d.measured
    assert d.max_in_flight == 1 and math.isinf(d.max_chars) and d.max_items <= max(1, min(cfg.cold_items, cfg.max_items))
    assert ad.timeout_for(cfg, s, d.max_items, 10**6, now) == cfg.timeout_cap
    assert ad.items_per_second(cfg, s) is None


@settings(max_examples=300)
@given(cfg=configs, obs=st.lists(observations, min_size=1, max_size=40), share=st.floats(0, 1), items_share=st.floats(0, 1))
def test_a_request_within_the_decision_is_never_cut_by_the_configured_timeout(cfg, obs, share, items_share):
    """Once measured, any request the decision allows is expected within the target, and its
    timeout leaves `factor x expected + margin` (the cap is never what bounds it)."""
    assume(cfg.timeout_cap >= cfg.timeout_margin + cfg.timeout_factor * ad.MIN_TARGET)
    s, now = _fold(cfg, obs)
    d = ad.decide(cfg, s, now)
    assume(d.measured and s.rate is not None and s.rate * ad.target(cfg) >= 1)
    items = max(1, int(d.max_items * items_share))
    chars = int(d.max_chars * share)
    expected = ad.expected_seconds(cfg, s, items, chars)
    assert expected is not None and expected <= ad.target(cfg) * (1 + 1e-9)
    t = ad.timeout_for(cfg, s, items, chars, now)
    assert t >= min(cfg.timeout_cap, cfg.timeout_factor * expected + cfg.timeout_margin) - 1e-9
    assert cfg.timeout_factor * expected + cfg.timeout_margin <= cfg.timeout_cap * (1 + 1e-9)


@settings(max_examples=300)
@given(cfg=configs, obs=st.lists(observations, max_size=30), a=st.integers(0, 10**7), b=st.integers(0, 10**7),
       items=st.integers(1, 256))
def test_a_larger_request_never_gets_a_shorter_timeout(cfg, obs, a, b, items):
    s, now = _fold(cfg, obs)
    small, large = sorted((a, b))
    assert ad.timeout_for(cfg, s, items, small, now) <= ad.timeout_for(cfg, s, items, large, now)
