"""Properties of the token pacer (processor.pure.token_pacing), alone and against the fake
OpenAI's sliding minute (processor.sandbox.fake_openai_limits.LimitState)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.pure import token_pacing as tp
from processor.sandbox.fake_openai_limits import LimitState, fmt_reset


def headers(limit: int, remaining: int, reset: float, rpm: int = 10_000, rrem: int = 9_000) -> dict[str, str]:
    return {
        "x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": str(remaining),
        "x-ratelimit-reset-tokens": fmt_reset(reset), "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(rrem), "x-ratelimit-reset-requests": "1s",
    }


def answered(limit: int, remaining: int, reset: float, now: float = 100.0) -> tp.Pacer:
    """A pacer whose one request (sent just before `now`) was answered with these figures."""
    p, d = tp.decide(tp.Pacer(), now - 0.01, 10)
    return tp.settle(p, now, headers(limit, remaining, reset), seq=d.seq, used=10)


@given(
    limit=st.integers(1_000, 200_000), frac=st.floats(0, 1), reset=st.floats(1.0, 59.0),
    asks=st.lists(st.tuples(st.floats(0, 0.99), st.integers(1, 20_000)), min_size=1, max_size=40),
)
def test_never_plans_more_than_the_server_said_remains(limit, frac, reset, asks):
    remaining = int(limit * frac)
    p = answered(limit, remaining, reset)
    granted = 0
    for offset, tokens in sorted(asks):
        tokens = min(tokens, limit)  # (one larger than the whole limit goes only when it is whole)
        p, d = tp.decide(p, 100.0 + offset * reset, tokens)  # all before the reset
        if d.wait == 0:
            granted += tokens
    assert granted <= remaining


@given(limit=st.integers(1_000, 200_000), reset=st.floats(0.5, 59.0), tokens=st.integers(1, 300_000), at=st.floats(0, 0.99))
def test_a_wait_for_tokens_ends_at_the_announced_reset_and_then_it_goes(limit, reset, tokens, at):
    p = answered(limit, 0, reset)  # spent
    now = 100.0 + at * reset
    p, d = tp.decide(p, now, tokens)
    assert d.reason == "tokens"
    assert abs((now + d.wait) - (100.0 + tp.parse_reset(fmt_reset(reset)))) < 1e-6
    p, d2 = tp.decide(p, now + d.wait, tokens)
    assert d2.wait == 0  # whole again (a request larger than the limit goes when it is whole)


@given(remaining=st.integers(0, 50_000), need=st.integers(1, 50_000))
def test_what_remains_is_used_at_once(remaining, need):
    p = answered(100_000, remaining, 30.0)
    p, d = tp.decide(p, 100.0, need)
    assert (d.wait == 0) == (need <= remaining)


@given(st.data())
def test_own_tokens_come_back_a_minute_after_their_answer(data):
    """Requests answered at t_i free their tokens at t_i + 60, before the announced reset."""
    p = tp.Pacer()
    t = 0.0
    sizes = data.draw(st.lists(st.integers(100, 5_000), min_size=2, max_size=10))
    for size in sizes:
        p, d = tp.decide(p, t, size)
        if d.wait:
            break
        t += 0.5
        p = tp.settle(p, t, headers(10_000, 0, 59.9), seq=d.seq, used=size)  # all spent, reset far
    need = data.draw(st.integers(1, 10_000))
    p, d = tp.decide(p, t, need)
    assert d.wait > 0
    assert t + d.wait <= t + 59.9 + 1e-9  # never past the reset
    answers = sorted(s.done + tp.WINDOW for s in p.sent if s.done is not None)
    assert any(abs(t + d.wait - a) < 1e-9 for a in answers) or abs(d.wait - 59.9) < 1e-6


@given(true_ratio=st.floats(0.3, 3.0), chars=st.integers(50, 20_000), n=st.integers(15, 40))
def test_estimates_adapt_to_usage_and_stay_on_the_high_side(true_ratio, chars, n):
    p = tp.Pacer()
    truth = round(chars / tp.CHARS_PER_TOKEN * true_ratio)
    for _ in range(n):
        p = tp.learn(p, chars, max(1, truth))
    est = tp.estimate(p, chars, items=1)
    assert est >= truth
    assert est <= truth * 1.10 + 2


@given(completion=st.integers(0, 2_000), n=st.integers(15, 40))
def test_chat_estimates_learn_the_completion(completion, n):
    p = tp.Pacer()
    for _ in range(n):
        p = tp.learn(p, 400, 100, completion)
    est = tp.estimate(p, 400, items=2, chat=True)
    assert est >= 100 + completion
    assert est <= (100 + completion) * 1.12 + 4


def test_before_the_first_answer_one_request_goes_and_a_server_without_limits_is_not_paced():
    p, d1 = tp.decide(tp.Pacer(), 0.0, 100)
    p, d2 = tp.decide(p, 0.0, 100)
    assert d1.wait == 0 and d2.reason == "first_answer" and d2.wait > 0
    p = tp.settle(p, 0.1, {}, seq=d1.seq, used=100)
    for i in range(50):
        p, d = tp.decide(p, 0.1, 1_000_000)
        assert d.wait == 0, i


def test_retry_after_holds_every_request_until_it_passed():
    p, d = tp.decide(tp.Pacer(), 0.0, 100)
    p = tp.settle(p, 1.0, headers(100_000, 90_000, 10.0), seq=d.seq, used=0, retry_after=7.0)
    p, d = tp.decide(p, 2.0, 100)
    assert (d.reason, d.wait) == ("retry_after", 6.0)
    p, d = tp.decide(p, 8.0, 100)
    assert d.wait == 0


def test_parse_reset_formats():
    assert tp.parse_reset("1s") == 1.0 and tp.parse_reset("6m0s") == 360.0 and tp.parse_reset("120ms") == 0.12
    assert tp.parse_reset("1h2m3.5s") == 3723.5 and tp.parse_reset("2.5") == 2.5
    assert tp.parse_reset("soon") is None and tp.parse_reset(None) is None and tp.parse_reset("-1") is None


@settings(max_examples=300, deadline=None)
@given(
    tpm=st.integers(2_000, 50_000),
    plan=st.lists(st.tuples(st.integers(1, 4_000), st.floats(0.0, 3.0), st.integers(0, 3)), min_size=5, max_size=60),
)
def test_against_a_sliding_minute_the_pacer_never_gets_a_429(tpm, plan):
    """Requests go when the pacer says, are charged their estimate by a sliding-minute
    server between sending and answering, and answered in any order with the figures as
    they stand when each answer leaves: the server never refuses one."""
    now = [0.0]
    server = LimitState(tpm=tpm, rpm=100_000, clock=lambda: now[0])
    p = tp.Pacer()
    in_flight: list[tuple[int, int, list[tuple[bytes, bytes]]]] = []  # (seq, tokens, headers at charge)
    for tokens, gap, answers in plan:
        tokens = min(tokens, tpm)
        now[0] += gap
        while True:
            p, d = tp.decide(p, now[0], tokens)
            if d.wait == 0:
                break
            if in_flight:  # an answer may come before the wait ends
                seq, used, hdrs = in_flight.pop(0)
                now[0] += 0.01
                p = tp.settle(p, now[0], {k.decode(): v.decode() for k, v in server.headers(now[0] - 0.005)}, seq=seq, used=used)
                continue
            now[0] += d.wait
        now[0] += 0.005  # on the wire
        accepted, _, hdrs = server.charge(tokens)
        assert accepted, (now[0], tokens, server.used(now[0]))
        in_flight.append((d.seq, tokens, hdrs))
        for _ in range(min(answers, len(in_flight))):
            seq, used, h = in_flight.pop(len(in_flight) - 1 if answers % 2 else 0)  # out of order
            now[0] += 0.01
            p = tp.settle(p, now[0], {k.decode(): v.decode() for k, v in server.headers(now[0] - 0.005)}, seq=seq, used=used)
