"""What the stages share without sharing an object: the settings they read, the retry
schedule, and the task API's error verdicts.

Each stage takes its own small port (`processor.stages.*.…Ports`, the report stage's
`Reporter`): the adapters it calls and the lifecycle (`stopping`), nothing else. The
composition root (`processor.wiring.build_pipeline`) builds them from the adapters.
Task state lives only in the `Book` (`processor.book`, over the pure lifecycle); what to
do after an error comes only from `processor.pure.policy`; every retry loop is
`processor.effects.retrying.retrying`. `processor.daemon` runs the stages in one nursery.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import attrs

from processor.effects.api import ApiError, fault_for_status
from processor.pure import policy
from processor.pure import retry as schedule
from processor.pure.faults import Dependency, Fault
from processor.pure.policy import Action

RELEASE_TIMEOUT = 3.0  # the shielded clean-up bound at shutdown


@attrs.frozen
class StageConfig:
    """What the stages read of the settings (`processor.wiring.stage_config`); the names are
    the settings' own."""

    intake_capacity: int = 256
    max_batch_size: int = 64
    batch_max_wait_ms: int = 50
    concurrency_limit: int = 5
    polling_interval_seconds: float = 30.0
    max_retries: int = 3
    ollama_max_retries: int = 3
    retry_backoff_factor: float = 2.0
    retry_max_delay_seconds: float = 30.0
    max_task_attempts: int = 5
    fallback_models: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class RetryConfig:
    """The stages' retry schedule (RETRY_BACKOFF_FACTOR, RETRY_MAX_DELAY_SECONDS, the retry
    counts) and this process's random draws."""

    factor: float = 2.0
    cap: float = 30.0
    max_retries: int = 3
    ollama_max_retries: int = 3
    rng: random.Random = attrs.field(factory=random.Random)

    @classmethod
    def of(cls, config: StageConfig, rng: random.Random) -> RetryConfig:
        return cls(factor=config.retry_backoff_factor, cap=config.retry_max_delay_seconds,
                   max_retries=config.max_retries, ollama_max_retries=config.ollama_max_retries, rng=rng)

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry `attempt` (pure schedule, this process's draw)."""
        policy = schedule.RetryPolicy(base=0.5, factor=self.factor, cap=self.cap)
        return schedule.backoff(policy, attempt, self.rng.random())


def api_fault(exc: ApiError) -> Fault:
    """The fault of a task API error (the adapter classified it; `effects.api.fault_for_status`)."""
    fault = getattr(exc, "fault", None)
    return fault if isinstance(fault, Fault) else fault_for_status(exc.status)


def api_retryable(exc: BaseException) -> bool | float:
    """`on` for the retry primitive: the policy's RETRY/PACE rows of the task API."""
    if not isinstance(exc, ApiError):
        return False
    if not exc.sent:  # never left (no token yet, breaker open): wait, unless the request cannot be built
        return api_fault(exc) is not Fault.INPUT
    r = policy.rule(Dependency.TASK_API, api_fault(exc))
    if r.action is Action.PACE:
        return exc.retry_after if exc.retry_after is not None else True
    if r.action in (Action.RETRY, Action.REFRESH_TOKEN):
        return True
    return False


