"""The functional core: decisions computed from immutable state.

Nothing in this package does I/O, reads a clock, draws random numbers or logs. Time
(`now`) and random draws come in as arguments; state is frozen attrs classes; each
function returns new state and a decision. Every module here has Hypothesis properties
in `tests/property/`.
"""
