"""The engine deployment's request router, decision by decision: Serve calls `choose_replicas` at each routing attempt
with the running replicas (what each reported holding) and the pending request, and tries the ranks it returns in
order. The race it exists for: replicas report what they hold through the controller, late."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402

from server.ray.routing import AdapterAffinityRouter  # noqa: E402

DEPLOYMENT = DeploymentID(name="LoraplexEngine", app_name="loraplex")


class Replica:
    """What the router reads of Serve's `RunningReplica`: its id and the multiplexed ids it reported."""

    def __init__(self, name: str, *held: str):
        self.replica_id = ReplicaID(name, DEPLOYMENT)
        self.multiplexed_model_ids = set(held)


def new_router(hold_s: float = 10.0) -> AdapterAffinityRouter:
    router = AdapterAffinityRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA)
    router.initialize_state(hold_s=hold_s)
    return router


def choose(router: AdapterAffinityRouter, replicas: list[Replica], model_id: str = "") -> list[list[str]]:
    async def attempt():
        request = PendingRequest([], {}, RequestMetadata("r", "r", multiplexed_model_id=model_id))
        ranks = await router.choose_replicas(replicas, request)
        assert request.routing_context.should_backoff  # a round in which no rank had room waits before the next
        return ranks

    return [sorted(r.replica_id.unique_id for r in rank) for rank in asyncio.run(attempt())]


def test_a_new_adapter_stays_on_the_replica_it_was_placed_on_before_that_replica_reports_it():
    a, b = Replica("a", "x", "y"), Replica("b", "x")
    router = new_router()
    assert choose(router, [a, b], "new") == [["b"], ["a"]]  # the one holding fewer ids, alone in the first rank
    b.multiplexed_model_ids |= {"p", "q"}  # b reports other loads, not yet "new": now a holds fewer
    for _ in range(5):  # Serve's own router would place "new" again, on a
        assert choose(router, [a, b], "new") == [["b"], ["a"]]
    b.multiplexed_model_ids.add("new")
    assert choose(router, [a, b], "new") == [["b"], ["a"]]


def test_placements_not_yet_reported_count_as_held():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    router = new_router()
    placed = [choose(router, replicas, f"n{i}")[0][0] for i in range(6)]
    assert sorted(placed) == ["a", "a", "b", "b", "c", "c"]  # spread, not all on the replica that reports nothing
    for r in replicas:  # reports that catch up are not counted twice
        r.multiplexed_model_ids |= {f"n{i}" for i, p in enumerate(placed) if p == r.replica_id.unique_id}
    assert len(set(choose(router, replicas, f"n{i}")[0][0] for i in (6, 7, 8))) == 3


def test_holders_first_then_the_others_holding_fewest():
    replicas = [Replica("a", "m"), Replica("b", "m", "p"), Replica("c", "p", "q", "r"), Replica("d", "p")]
    router = new_router()
    assert choose(router, replicas, "m") == [["a", "b"], ["c", "d"]]  # the second rank: when a and b have no room
    assert choose(router, replicas, "m")[1] == ["c", "d"]
    ranks = choose(router, replicas, "p")  # three hold it: two of them, as Serve's power of two choices
    assert len(ranks[0]) == 2 and set(ranks[0]) <= {"b", "c", "d"} and ranks[1] == ["a"]


def test_a_placement_ends_with_its_hold_or_its_replica():
    a, b = Replica("a"), Replica("b", "x")
    router = new_router()
    assert choose(router, [a, b], "n")[0] == ["a"]
    assert choose(router, [b], "n") == [["b"], []]  # a died (Serve dropped it): placed again, on b
    a2, b2 = Replica("a"), Replica("b", "x")
    expiring = new_router(hold_s=0.0)
    assert choose(expiring, [a2, b2], "n")[0] == ["a"]
    a2.multiplexed_model_ids |= {"y", "z"}  # a never loaded "n" and now holds more: the placement is not kept
    assert choose(expiring, [a2, b2], "n")[0] == ["b"]


def test_requests_without_an_id_go_to_two_random_replicas():
    replicas = [Replica("a", "x"), Replica("b"), Replica("c")]
    router = new_router()
    seen = set()
    for _ in range(30):
        (rank,) = choose(router, replicas)
        assert len(rank) == 2
        seen |= set(rank)
    assert seen == {"a", "b", "c"} and not router.placed
