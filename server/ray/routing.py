"""The ingress's engine client: each request is one streaming call to an engine replica, routed by its adapters.

`RemoteEngine.run` sends a request's choices, prompt tokens and sampling parameters, with the version ids of its
adapters, to the engine deployment under the request's multiplexed model id (`server.ray.replica.set_id`): Serve's
router prefers a replica that holds it. Outputs come back as they are generated. If the replica dies before any token
came back, the request is sent once more (Serve has dropped the dead replica by then, so another one takes it); once
tokens have been streamed, every unfinished choice ends with an error (the stream's error event and `[DONE]`). The
replica that served each request is recorded in `SERVED_BY`, for the `x-loraplex-replica` header.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

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
