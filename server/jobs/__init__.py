"""Training jobs: OpenAI fine-tuning shaped, run in worker processes beside the serving engine.

- `config`: limits and resources (torch-free).
- `service`: what the routes call — files in, jobs created (every check at creation), cancelled, and a finished
  job's adapter handed to the catalog.
- `store`: the durable record (SQLite): files, jobs with their state machine, events.
- `supervisor`: starts queued jobs in worker processes, watches them, gives each exactly one final state.
- `worker`: one job in its own process (`adapters.training.trainer.train`).
"""
