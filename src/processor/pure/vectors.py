"""Check what a backend returned before it is reported: garbage never reaches the API."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import Any

import attrs


@attrs.frozen
class VectorOk:
    vector: list[float]


@attrs.frozen
class VectorBad:
    reason: str


def check_vector(value: Any, expected_dim: int | None) -> VectorOk | VectorBad:
    """One finite vector of the expected dimension (None: any non-empty size)."""
    if not isinstance(value, (list, tuple)):
        return VectorBad(f"backend returned a {type(value).__name__}, not a vector")
    if not value:
        return VectorBad("backend returned an empty vector")
    if expected_dim is not None and len(value) != expected_dim:
        return VectorBad(f"vector has {len(value)} dimensions, expected {expected_dim}")
    # Fast path (this runs for every task): array() converts in C and rejects non-numbers;
    # a finite sum proves every element finite (inf and nan propagate through a sum).
    if bool not in set(map(type, value)):
        try:
            packed = array("d", value)
        except TypeError:
            packed = None
        if packed is not None and math.isfinite(sum(packed)):
            return VectorOk(packed.tolist())
    for x in value:  # slow path: find the culprit (or a finite vector whose sum overflowed)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return VectorBad(f"vector holds a non-finite or non-numeric value ({str(x)[:20]})")
    return VectorOk([float(x) for x in value])


def check_batch(
    vectors: Sequence[Any], n_inputs: int, expected_dim: int | None
) -> tuple[list[VectorOk | VectorBad], int | None]:
    """Check a batch answer; returns per-input verdicts and the dimension learnt.

    When no dimension is known yet, the first good vector fixes it for the rest.
    """
    if len(vectors) != n_inputs:
        bad = VectorBad(f"backend returned {len(vectors)} vectors for {n_inputs} inputs")
        return [bad] * n_inputs, expected_dim
    out: list[VectorOk | VectorBad] = []
    dim = expected_dim
    for v in vectors:
        verdict = check_vector(v, dim)
        if isinstance(verdict, VectorOk) and dim is None:
            dim = len(verdict.vector)
        out.append(verdict)
    return out, dim


@attrs.frozen
class AnswerOk:
    vectors: list[list[float]]
    dim: int


@attrs.frozen
class AnswerBad:
    """A whole answer that cannot be used. `dimension` is True when every vector is fine but
    of one size other than the expected one (a configuration problem, not garbage)."""

    reason: str
    dimension: bool = False
    size: int = 0  # the size every vector had, when `dimension`


def check_answer(vectors: Any, n_inputs: int, expected_dim: int | None) -> AnswerOk | AnswerBad:
    """Check a backend's whole answer for a batch of `n_inputs` inputs.

    Either every vector is finite, non-empty and of one size (the expected one when known),
    or the answer as a whole is bad: one wrong vector means the server misbehaved, which is
    never the fault of one input. A batch whose vectors all share one size other than
    `expected_dim` is a dimension mismatch.
    """
    if not isinstance(vectors, (list, tuple)):
        return AnswerBad(f"the answer holds a {type(vectors).__name__} where a list of vectors belongs")
    if len(vectors) != n_inputs:
        return AnswerBad(f"the answer holds {len(vectors)} vectors for {n_inputs} inputs")
    out: list[list[float]] = []
    for i, v in enumerate(vectors):
        verdict = check_vector(v, None)
        if isinstance(verdict, VectorBad):
            return AnswerBad(f"vector {i}: {verdict.reason}")
        out.append(verdict.vector)
    sizes = {len(v) for v in out}
    if len(sizes) > 1:
        return AnswerBad(f"vectors of different sizes in one answer ({', '.join(map(str, sorted(sizes)[:4]))})")
    dim = sizes.pop() if sizes else (expected_dim or 0)
    if expected_dim is not None and out and dim != expected_dim:
        return AnswerBad(f"vectors have {dim} dimensions, expected {expected_dim}", dimension=True, size=dim)
    return AnswerOk(out, dim)
