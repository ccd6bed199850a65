"""The training worker: one job in its own process, so serving goes on while it trains.

Started with the `spawn` method by `server.jobs.supervisor.JobSupervisor`. It bounds its own thread count
before torch does any work, runs `adapters.training.trainer.train`, and reports through one queue:
`{"kind": "event", ...}` for each trainer event, then exactly one `{"kind": "result", ...}`.
Two events steer it: `cancel` (the user's) and `shutdown` (the server's, to resume later). The
trainer checks them after every optimizer step, as it does the wall-clock budget and whether
the server process is still there (a worker never outlives its server).
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

# why the trainer stopped early → how the job ends
CANCELLED, SHUTDOWN, TIME_LIMIT, ORPHANED = "cancelled", "shutdown", "time_limit", "orphaned"


def main(spec: dict[str, Any], queue, cancel, shutdown) -> None:
    """Run one job: `spec` holds TrainConfig's fields plus `threads`, `max_seconds` and `seconds_used`."""
    threads = spec.pop("threads")
    os.nice(spec.pop("nice"))  # serving keeps priority over training on shared cores
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from adapters.training.config import TrainConfig
    from adapters.training.data import DataError
    from adapters.training.trainer import train

    started, parent = time.monotonic(), os.getppid()
    budget = spec.pop("max_seconds") - spec.pop("seconds_used")

    def should_stop() -> str | None:
        if cancel.is_set():
            return CANCELLED
        if shutdown.is_set():
            return SHUTDOWN
        if os.getppid() != parent:
            return ORPHANED
        if time.monotonic() - started > budget:
            return TIME_LIMIT
        return None

    def on_event(event: dict) -> None:
        queue.put({"kind": "event", **event})

    try:
        result = train(TrainConfig(**spec), on_event=on_event, should_stop=should_stop)
        queue.put({"kind": "result", "status": result.status, "reason": result.reason, "steps": result.steps,
                   "total_steps": result.total_steps, "trained_tokens": result.trained_tokens,
                   "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                   "energy_retained": result.energy_retained, "seconds": time.monotonic() - started})
    except DataError as e:
        queue.put({"kind": "result", "status": "error", "message": f"invalid training data: {e}"})
    except Exception as e:  # the job fails with the reason; the traceback goes to the server's log
        traceback.print_exc()
        queue.put({"kind": "result", "status": "error", "message": f"training failed: {e.__class__.__name__}: {e}"})
    queue.close()
    queue.join_thread()
