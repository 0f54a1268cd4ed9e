"""Token and spend budget settings (off by default) and the price table."""

from __future__ import annotations

from processor.pure.budget import DEFAULT_PRICES, ModelPrice
from tests.test_config import load, problems


def test_budgets_are_off_by_default_with_the_dated_price_table():
    s, _ = load()
    assert s.token_limits.enabled() == {} and s.spend_limits.enabled() == {}
    assert s.model_prices == dict(DEFAULT_PRICES) and s.model_prices["o3"] == ModelPrice(2_000_000, 8_000_000)


def test_token_tiers_spend_caps_and_prices():
    s, _ = load(RATE_LIMIT_TOKENS_PER_MINUTE="100000", RATE_LIMIT_TOKENS_PER_MONTH="50000000", SPEND_LIMIT_PER_DAY="12.50",
                SPEND_LIMIT_PER_MONTH="300", MODEL_PRICES='{"o3": {"input": 2, "output": 8}, "text-embedding-3-small": 0.02}')
    assert s.token_limits.enabled() == {"minute": 100_000, "month": 50_000_000}
    assert s.spend_limits.enabled() == {"day": 12_500_000_000, "month": 300_000_000_000}  # nano-units
    assert s.model_prices == {"o3": ModelPrice(2_000_000, 8_000_000), "text-embedding-3-small": ModelPrice(20_000)}


def test_bad_budget_values_are_named():
    got = problems(RATE_LIMIT_TOKENS_PER_DAY="-5", SPEND_LIMIT_PER_DAY="a lot", SPEND_LIMIT_PER_MONTH="-1",
                   MODEL_PRICES='{"o3": {"input": "free"}}')
    assert {"RATE_LIMIT_TOKENS_PER_DAY", "SPEND_LIMIT_PER_DAY", "SPEND_LIMIT_PER_MONTH", "MODEL_PRICES"} <= set(got)
    for bad in ('[1, 2]', '{"o3": {"output": 8}}', '{"o3": {"input": 1, "cached": 0.5}}', "not json", '{"o3": true}'):
        assert "MODEL_PRICES" in problems(MODEL_PRICES=bad), bad
