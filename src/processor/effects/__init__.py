"""The imperative shell: adapters that each own one kind of I/O.

`http` (one HTTP stack), `auth` (OAuth2 tokens), `api` (the task API), `backends`
(OpenAI, Ollama, mock), `store` (SQLite: rate limits, journal, outbox), `redis_state`
(shared quotas and leases), `guard` (breakers and retries carried out), `metrics`,
`logs`, `health` (the /health, /ready, /metrics server).
"""
