"""The data path, one module per stage, in the order work flows:

intake (poll + parse) -> claim (lease, reserve, journal, PATCH in_progress) ->
embed (batch, backend call, check, outbox) -> report (PATCH succeeded/failed).
`recovery` runs first at start-up and then periodically (stale claims).
Each stage takes its own frozen port, only what it touches (`IntakePorts`, `ClaimPorts`,
`BatchPorts`, `EmbedPorts`, `Reporter`, `RecoveryPorts`, `budget.Budgets`), built by the
composition root (`processor.wiring.build_pipeline`).
"""
