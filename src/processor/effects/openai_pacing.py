"""The shell of `processor.pure.token_pacing`: one pacer per model, on trio's clock, shared
by the OpenAI adapters (embeddings and chat).

    pace = pacer.model(model)
    tokens = pace.estimate(chars, items=len(texts))     # chat: pace.estimate(chars, chat=True)
    await pace.wait_turn(tokens)                         # or: while (w := pace.before(tokens)): sleep(w)
    try:
        ... send ...
        pace.after(headers, usage_tokens, chars=chars)   # any answer, 429 included (used=0)
    finally:
        pace.forget()                                    # no answer: release the reservation

`before` and `after` pair up per trio task (a task has one request in flight per model).
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from processor.effects.logs import get_logger
from processor.pure import token_pacing as tp


class ModelPacer:
    def __init__(self, model: str) -> None:
        self.model = model
        self.state = tp.Pacer()
        self._mine: dict[trio.lowlevel.Task, int] = {}  # reservation of each task in flight
        self._answered = trio.Event()  # set by every answer: waiters look again
        self.waits = 0  # times a request waited (diagnostics, tests)
        self._log = get_logger("openai_pacing")

    def estimate(self, chars: int, *, items: int = 1, chat: bool = False) -> int:
        return tp.estimate(self.state, chars, items=items, chat=chat)

    def before(self, request_tokens: int) -> float:
        """0.0: go now (the tokens are reserved for this task); else seconds to wait before
        asking again (an answer may make room sooner: `wait_turn` wakes on it)."""
        self.state, decision = tp.decide(self.state, trio.current_time(), request_tokens)
        if decision.wait == 0.0:
            self._mine[trio.lowlevel.current_task()] = decision.seq
        return decision.wait

    async def wait_turn(self, request_tokens: int) -> None:
        waited = False
        while (wait := self.before(request_tokens)) > 0:
            if not waited:
                self.waits += 1
                waited = True
                self._log.debug("openai_pacing_wait", model=self.model, tokens=request_tokens, wait_seconds=round(wait, 3))
            answered = self._answered
            with trio.move_on_after(wait):
                await answered.wait()

    def after(
        self, headers: Mapping[str, str] | None, usage: int | None = None, *, completion: int | None = None,
        chars: int = 0, retry_after: float | None = None,
    ) -> None:
        """The answer to this task's request (`headers` None: no answer came). `usage`: the
        tokens the server charged (prompt, or all for embeddings); `completion`: chat's
        completion tokens; `chars`: the request's characters, to learn the estimate."""
        seq = self._mine.pop(trio.lowlevel.current_task(), None)
        if seq is None:
            return
        if headers is None:
            self.state = tp.cancel(self.state, trio.current_time(), seq=seq)
        else:
            used = None if usage is None else usage + (completion or 0)
            self.state = tp.settle(self.state, trio.current_time(), headers, seq=seq, used=used, retry_after=retry_after)
            if usage or completion:
                self.state = tp.learn(self.state, chars, usage, completion)
        self._answered.set()
        self._answered = trio.Event()

    def forget(self) -> None:
        """Release this task's reservation if no answer settled it (idempotent)."""
        if trio.lowlevel.current_task() in self._mine:
            self.after(None)


class TokenPacer:
    """The pacers of one OpenAI account, by model (OpenAI's limits are per model)."""

    def __init__(self) -> None:
        self._models: dict[str, ModelPacer] = {}

    def model(self, model: str) -> ModelPacer:
        pacer = self._models.get(model)
        if pacer is None:
            pacer = self._models[model] = ModelPacer(model)
        return pacer
