"""The HTTP layer: the OpenAI-compatible API and loraplex's own routes (API.md), on FastAPI.

- `app`: `create_app(settings)` — the app, its start-up (model, engine, catalog) and its drain.
- `state`: the typed app state and the dependencies routes take it through (auth, readiness).
- `routes/`: one module per resource (health, models, completions, adapters, files, jobs); they only validate,
  translate and map errors.
- `openai`: the OpenAI translation layer — requests into engine requests, outputs into responses and SSE chunks.
- `protocol`: the request schemas; `errors`: the error envelope; `auth`, `limits`, `metrics`, `config`.
"""
