"""The ingress's engine client: each request is one streaming call to an engine replica, routed by its adapters.

`RemoteEngine.run` sends a request's choices, prompt tokens and sampling parameters, with the version ids of its
adapters, to the engine deployment under the request's multiplexed model id (`server.ray.replica.set_id`): Serve's
router prefers a replica that holds it. Outputs come back as they are generated. If the replica dies before any token
came back, the request is sent once more (Serve has dropped the dead replica by then, so another one takes it); once
tokens have been streamed, every unfinished choice ends with an error (the stream's error event and `[DONE]`). The
replica that served each request is recorded in `SERVED_BY`, for the `x-loraplex-replica` header.

`AdapterAffinityRouter` is the engine deployment's request router (it runs in the ingress, inside the handle).
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from adapters.tiers.registry import AdapterNotFound
from server.engine.async_engine import Overloaded
from server.engine.request import AdapterUse, RequestOutput
from server.engine.sampling import SamplingParams
from server.ray.replica import AdapterRef, ModelCard, Refused, Started, failed_outputs, set_id

log = logging.getLogger(__name__)

SERVED_BY: ContextVar[list[str] | None] = ContextVar("loraplex_served_by", default=None)
"""Set (to an empty list) per HTTP request by the ingress; each engine replica that takes the request is appended."""

_REPLICA_LOST = (RayActorError, ReplicaUnavailableError)


class RemoteEngine:
    """Engine replicas of a Ray Serve application, as the OpenAI layer's engine client."""

    alive = True  # Serve health-checks the replicas and replaces dead ones
    compiling = False  # a replica is healthy only once its engine is built and warmed (`server.ray.replica`)
    pool = merger = None  # what each replica holds is its own (the console shows the store's adapters only)

    def __init__(self, handle: DeploymentHandle, max_waiting: int, affinity: bool = True,
                 on_retry: Callable[[], None] = lambda: None):  # fmt: skip
        """`max_waiting`: a replica's queue (the most choices one request may start); `affinity` False: no
        multiplexed model id (Serve's default routing, by queue length only); `on_retry()` after each request sent
        again."""
        self.handle = handle.options(stream=True)
        self.max_waiting = max_waiting
        self.affinity, self.on_retry = affinity, on_retry

    async def describe(self) -> ModelCard:
        """The model's card, from any engine replica."""
        return await self.handle.options(stream=False).describe.remote()

    def stop(self) -> None:
        """Nothing of the engines' to stop here: Serve owns the replicas."""

    async def run(self, prompts: list[list[int]], params: list[SamplingParams], adapters: list[AdapterUse]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        refs = [AdapterRef(u.adapter.version_id, u.weight) for u in adapters]
        model_id = set_id(refs) if self.affinity else ""
        unfinished = set(range(len(params)))
        for attempt in (1, 2):
            stream = self.handle.options(multiplexed_model_id=model_id).generate.remote(prompts, params, refs)
            streamed = done = False
            try:
                async for msg in stream:
                    if isinstance(msg, Started):
                        served = SERVED_BY.get()
                        if served is not None:
                            served.append(msg.replica)
                    elif isinstance(msg, Refused):
                        if msg.status == 404:
                            raise AdapterNotFound(msg.name)
                        raise Overloaded(msg.message)
                    else:
                        i, out = msg
                        streamed = streamed or bool(out.token_ids)
                        if out.finish_reason is not None:
                            unfinished.discard(i)
                        yield i, out
                done = True
                return
            except _REPLICA_LOST as e:
                if attempt == 1 and not streamed:
                    self.on_retry()
                    log.warning("engine replica lost before the first token (%s): sending the request again",
                                e.__class__.__name__)  # fmt: skip
                    continue
                log.warning("engine replica lost while streaming (%s)", e.__class__.__name__)
                message = "the engine replica serving this request stopped"
            except (AdapterNotFound, Overloaded):
                done = True
                raise
            except Exception:  # no request without an ending
                log.exception("engine replica call failed")
                message = "internal error in an engine replica"
            finally:
                if not done:
                    stream.cancel()  # the client went away (or the replica did): abort what still runs there
            for item in failed_outputs(sorted(unfinished), message):
                yield item
            return


class AdapterAffinityRouter(RequestRouter):
    """Routes a request to a replica that holds its multiplexed model id (its adapter or adapter set), else places
    the id on the replica holding the fewest, and remembers that placement itself.

    Serve's own router (power of two choices with its multiplex and FIFO mixins) learns which replica holds which id
    from the replicas, through the controller, some hundreds of milliseconds after a load; a second request of a new
    adapter arriving meanwhile goes to whichever replica holds the fewest ids, and often loads the adapter there too,
    so its traffic splits over both for good. Its FIFO mixin may also hand the replica chosen for one request to an
    older request of another adapter. Here each placement is kept for `hold_s` seconds (longer than Serve takes to
    report it), each request goes to the replica chosen for it, and a request leaves the replicas holding its id only
    when those have no room in their queues (`max_ongoing_requests`) or do not answer the queue-length probe.
    Requests without an id (the base model, or `adapter_affinity` off) take the less loaded of two random replicas.
    """

    def initialize_state(self, hold_s: float = 10.0) -> None:
        self.hold_s = hold_s
        self.placed: dict[str, tuple[ReplicaID, float]] = {}
        """model id → (the replica this router placed it on, when): ids the replicas may not have reported yet"""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        """Ranks of replicas, best first: those holding the request's id (two of them at random), then the others
        holding the fewest ids (two)."""
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # when no rank has room: wait, then choose again
        if not model_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        now = time.monotonic()
        self.placed = {m: p for m, p in self.placed.items() if now - p[1] < self.hold_s}
        placed = self.placed.get(model_id, (None, 0.0))[0]
        holders = [r for r in candidate_replicas if model_id in r.multiplexed_model_ids or r.replica_id == placed]
        placements = defaultdict(set)  # some not reported by their replica yet
        for m, (replica_id, _) in self.placed.items():
            placements[replica_id].add(m)
        others = sorted((r for r in candidate_replicas if r not in holders),
                        key=lambda r: (len(r.multiplexed_model_ids | placements[r.replica_id]), random.random()))  # fmt: skip
        if holders:
            return [random.sample(holders, min(2, len(holders))), others[:2]]
        self.placed[model_id] = (others[0].replica_id, now)
        return [others[:1], others[1:3]]
