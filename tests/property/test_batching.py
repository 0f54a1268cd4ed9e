"""Batching preserves every task exactly once, respects size, and never holds a batch
past its wait."""

from hypothesis import given
from hypothesis import strategies as st

from processor.pure import batching

events = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(min_value=0, max_value=0.2)), max_size=200)


@given(events, st.integers(min_value=1, max_value=16), st.floats(min_value=0, max_value=0.1))
def test_every_item_exactly_once_and_batches_bounded(evts, max_size, max_wait):
    state = batching.Batcher(max_size, max_wait)
    now = 0.0
    out = []
    for i, (key, dt) in enumerate(evts):
        now += dt
        state, ready = batching.due(state, now)
        out += ready
        state, ready = batching.add(state, key, i, now)
        out += ready
        deadline = batching.next_deadline(state)
        if deadline is not None:  # never held past the hard cap
            assert deadline <= min(b.opened_at for b in state.open.values()) + batching.HOLD_FACTOR * max_wait + 1e-9
    state, ready = batching.flush(state)
    out += ready
    items = [x for b in out for x in b.items]
    assert sorted(items) == list(range(len(evts)))
    for b in out:
        assert 1 <= len(b.items) <= max_size
        assert all(evts[i][0] == b.key for i in b.items)
        assert list(b.items) == sorted(b.items)  # order kept within a key


@given(st.floats(min_value=0.001, max_value=1), st.floats(min_value=0, max_value=100))
def test_lone_item_closes_at_its_deadline(max_wait, t0):
    state, ready = batching.add(batching.Batcher(64, max_wait), "k", "x", t0)
    assert not ready
    assert batching.next_deadline(state) == t0 + max_wait
    state, ready = batching.due(state, t0 + max_wait / 2)
    assert not ready
    state, ready = batching.due(state, t0 + max_wait)
    assert [b.items for b in ready] == [("x",)] and batching.next_deadline(state) is None


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=100), st.integers(min_value=1, max_value=10), st.integers(min_value=1, max_value=120))
def test_chunk_respects_items_and_weight(weights, max_items, max_weight):
    chunks = batching.chunk(weights, max_items=max_items, max_weight=max_weight, weight=float)
    assert [w for c in chunks for w in c] == weights
    for c in chunks:
        assert 1 <= len(c) <= max_items
        assert sum(c) <= max_weight or len(c) == 1


@given(st.lists(st.integers(), min_size=2, max_size=50))
def test_halves_split_everything(items):
    left, right = batching.halves(items)
    assert left + right == items and left and right


@given(st.floats(0.01, 1), st.integers(2, 200))
def test_a_steady_stream_fills_the_batch_but_never_past_the_cap(max_wait, n):
    """Items every max_wait/10: the batch keeps filling, and closes by the hold cap at the latest."""
    state = batching.Batcher(64, max_wait)
    out = []
    now = 0.0
    for i in range(n):
        state, ready = batching.due(state, now)
        out += ready
        state, ready = batching.add(state, "k", i, now)
        out += ready
        now += max_wait / 10
    state, rest = batching.flush(state)
    for b in out:  # closed by size, or by the cap: never small while the stream flows
        assert len(b.items) == 64 or len(b.items) >= batching.HOLD_FACTOR * 10 - 1
