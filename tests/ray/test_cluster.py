"""loraplex on a real local Ray cluster (127.0.0.1): one ingress and two engine replicas of the tiny model.

One cluster for the whole module, its tests in order: the same answers as one process, the replica header,
adapter-affine routing under Zipf traffic, read-after-write / overwrite / delete across replicas, a training job on a
Ray worker served by both replicas, and last a replica killed under load.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.cluster import process_tree
from tests.live import tiny_settings
from tests.server.jobs.test_jobs import TRAIN
from tests.tiny import make_peft_adapter

ray = pytest.importorskip("ray")  # with RAY_AUTH_MODE=token (tests/ray/conftest.py)

from ray import serve  # noqa: E402

REPLICA = "x-loraplex-replica"
ENGINE_ACTOR = "SERVE_REPLICA::loraplex#LoraplexEngine#"
CLUSTER_SETTINGS = dict(replicas=2, replica_num_cpus=1, job_num_cpus=1, training_threads=1, max_waiting=64, lora_pages=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    process: subprocess.Popen


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, llama_dir, adapter_dir):
    """`loraplex serve --replicas 2` as users run it (a local Ray instance of its own); this process joins that
    instance as a driver, to kill a replica and read Serve's status."""
    work = tmp_path_factory.mktemp("cluster")
    settings = tiny_settings(llama_dir, work / "data", adapter_dir=adapter_dir, port=free_port(), **CLUSTER_SETTINGS)
    flags = [f"--{k.replace('_', '-')}={getattr(settings, k)}" for k in settings.model_fields_set]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("LORAPLEX_")}
    log = work / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).with_name("loraplex")), "serve", *flags], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=work)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (m := re.search(r"serving on (\S+) through Ray Serve .*Ray at (\S+)\)", log.read_text(errors="replace"))):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        ray.init(address=m[2], log_to_driver=False)
        yield Served(m[1], process)
    finally:
        ray.shutdown()
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(90) == 0, log.read_text(errors="replace")[-3000:]
        finally:
            process.kill()
    host, port = m[2].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # the Ray instance it started is gone with it
        socket.create_connection((host, int(port)), timeout=5).close()


@pytest.fixture
def rh(cluster):
    with httpx.Client(base_url=cluster.url, timeout=120) as c:
        yield c


def engine_replicas() -> dict[str, str]:
    """{replica id: actor name} of the engine replicas alive now."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return {n.rsplit("#", 1)[-1]: n for n in names if n.startswith(ENGINE_ACTOR)}


def chat(h: httpx.Client, model: str = "llama", adapters: list | None = None, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 8,
            "temperature": 0} | extra  # fmt: skip
    if adapters:
        body["adapters"] = adapters
    return h.post("/v1/chat/completions", json=body)


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def upload(h: httpx.Client, name: str, directory, overwrite: bool = False) -> httpx.Response:
    files = {f: (f, (directory / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    return h.post("/v1/adapters", params={"overwrite": str(overwrite).lower()}, data={"name": name}, files=files)


def sse_lines(h: httpx.Client, path: str, body: dict) -> tuple[int, str, list[str]]:
    with h.stream("POST", path, json=body | {"stream": True}) as r:
        return r.status_code, r.headers.get(REPLICA, ""), [line for line in r.iter_lines() if line]


def strip(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def same(ours, theirs) -> bool:
    """Equal, floats (logprobs) to 1e-5: two servers reach them by differently batched float sums (a prefix-cache
    hit, another batch shape), equal to ~1e-7, not bit for bit."""
    if isinstance(ours, float) and isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=0, abs_tol=1e-5)
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(same(a, b) for a, b in zip(ours, theirs))
    return ours == theirs


CASES = [
    ("/v1/completions", {"model": "llama", "prompt": "Hello world", "max_tokens": 8, "temperature": 0}),
    ("/v1/completions", {"model": "alpha", "prompt": "The capital of", "max_tokens": 6, "n": 2, "temperature": 0.8,
                         "seed": 7, "logprobs": 2}),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                              "temperature": 0}),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                              "temperature": 0, "adapters": [{"name": "alpha", "weight": 0.5},
                                                             {"name": "beta", "weight": 0.5}]}),
]  # fmt: skip


def test_same_answers_as_one_process(rh, http):
    """`http`: the single-process server of the same tiny model and adapters (tests/conftest.py)."""
    for path, body in CASES:
        ours, theirs = rh.post(path, json=body), http.post(path, json=body)
        assert ours.status_code == theirs.status_code == 200, ours.text
        assert same(strip(ours.json()), strip(theirs.json())), (body, ours.json(), theirs.json())
    body = CASES[2][1] | {"stream_options": {"include_usage": True}}
    status, _, ours = sse_lines(rh, "/v1/chat/completions", body)
    _, _, theirs = sse_lines(http, "/v1/chat/completions", body)
    assert status == 200 and ours[-1] == "data: [DONE]"
    assert [strip_sse(x) for x in ours] == [strip_sse(x) for x in theirs]


def strip_sse(line: str) -> str:
    return line if line == "data: [DONE]" else str(strip(json.loads(line.removeprefix("data: "))))


def test_every_response_names_its_replica(rh):
    replicas = engine_replicas()
    assert len(replicas) == 2
    assert chat(rh, "alpha").headers[REPLICA] in replicas
    status, replica, lines = sse_lines(rh, "/v1/completions", {"model": "llama", "prompt": "Hi", "max_tokens": 3})
    assert status == 200 and replica in replicas and lines[-1] == "data: [DONE]"
    missing = chat(rh, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    for r in (missing, rh.get("/health/ready"), rh.get("/v1/models")):
        assert r.headers[REPLICA].startswith("ingress:")  # answered by the ingress alone
    assert rh.get("/health/ready").json()["status"] == "ready"


def test_serve_runs_its_throughput_optimized_mode(cluster, rh):
    """The local Ray instance `loraplex serve --replicas` started: every Serve process (controller, proxy, ingress,
    engine replicas) has Ray Serve's throughput-optimized mode, less the direct ingress, at the niceness of any other
    process."""
    serve_processes = [pid for pid in process_tree(cluster.process.pid)
                       if re.match(rb"ray::(ServeController|ProxyActor|ServeReplica)", Path(f"/proc/{pid}/cmdline").read_bytes())]  # fmt: skip
    assert len(serve_processes) >= 5  # the controller, a proxy, the ingress and two engine replicas
    for pid in serve_processes:
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        assert (env.get(b"RAY_SERVE_THROUGHPUT_OPTIMIZED"), env.get(b"RAY_SERVE_ENABLE_DIRECT_INGRESS")) == (b"1", b"0")
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0  # not Ray's default niceness of workers (15)
    assert text(chat(rh, "alpha"))  # and it serves


def test_adapter_affine_routing(rh, llama_dir, tmp_path):
    names = [f"zipf{i}" for i in range(8)]
    for i, name in enumerate(names):
        assert upload(rh, name, make_peft_adapter(llama_dir, tmp_path / name, "llama", r=4, seed=10 + i)).status_code == 201
    for name in names:  # each adapter's first request loads it on one replica
        text(chat(rh, name, max_tokens=2))
    rng = random.Random(0)
    traffic = rng.choices(names, [1 / (k + 1) ** 1.1 for k in range(len(names))], k=96)  # Zipf
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda name: (name, chat(rh, name, max_tokens=4).headers[REPLICA]), traffic))
    for name in set(traffic):
        replicas = Counter(r for n, r in served if n == name)
        share = replicas.most_common(1)[0][1] / sum(replicas.values())
        assert share >= 0.9, (name, replicas)
    assert len({r for _, r in served}) == 2  # and both replicas work


def served_on_both(rh, http, name: str, expected: str) -> None:
    """`name` answers as `expected` does on the single server, on both replicas: each weighted set is a new
    multiplexed id, which Serve sends to the replica holding the fewest."""
    replicas = set()
    for w in (0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5):
        r = chat(rh, adapters=[{"name": name, "weight": w}])
        assert text(r) == text(chat(http, adapters=[{"name": expected, "weight": w}])), (name, w)
        replicas.add(r.headers[REPLICA])
        if len(replicas) == 2:
            return
    pytest.fail(f"{name} was served by {replicas} only")


def test_read_after_write_overwrite_and_delete(rh, http, adapter_dir):
    assert upload(rh, "rw", adapter_dir / "alpha").status_code == 201
    served_on_both(rh, http, "rw", "alpha")  # servable everywhere once the upload returned
    assert text(chat(rh, "rw")) == text(chat(http, "alpha"))
    first = rh.get("/v1/adapters/rw").json()
    r = upload(rh, "rw", adapter_dir / "beta", overwrite=True)
    assert r.status_code == 201 and r.json()["version"] == first["version"] + 1
    assert text(chat(rh, "rw")) == text(chat(http, "beta"))  # no replica serves the old version any more
    served_on_both(rh, http, "rw", "beta")
    assert rh.delete("/v1/adapters/rw").status_code == 204
    for r in (chat(rh, "rw"), chat(rh, adapters=[{"name": "rw", "weight": 0.5}]), rh.get("/v1/adapters/rw")):
        assert r.status_code == 404
    bad = rh.post("/v1/adapters", data={"name": "rw"}, files={"adapter_config.json": ("adapter_config.json", b"{")})
    assert bad.status_code == 400 and rh.get("/v1/adapters/rw").status_code == 404  # nothing changed


def wait_for(rh, job: dict, until, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while not until(job):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = rh.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    return job


def train(rh, name: str, steps: int) -> dict:
    file_id = rh.post("/v1/files", files={"file": ("t.jsonl", TRAIN, "application/jsonl")},
                      data={"purpose": "fine-tune"}).json()["id"]  # fmt: skip
    body = {"training_file": file_id, "adapter_name": name, "seed": 0,
            "method": {"type": "lora", "hyperparameters": {"rank": 4, "learning_rate": 1e-2, "batch_size": 3,
                                                           "max_steps": steps}}}  # fmt: skip
    r = rh.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_a_training_job_on_a_ray_worker_can_be_cancelled(rh):
    job = train(rh, "never", steps=5000)
    job = wait_for(rh, job, lambda j: (j.get("metrics") or {}).get("step", 0) >= 1)  # running, steps under way
    rh.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    job = wait_for(rh, job, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "cancelled" and job["metrics"]["step"] < 5000
    assert rh.get("/v1/adapters/never").status_code == 404


def test_training_job_runs_as_a_ray_task_and_is_served_by_both_replicas(rh, http):
    job = wait_for(rh, train(rh, "trained", steps=6), lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    events = rh.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert sorted(e["data"]["step"] for e in events if e["data"] and "loss" in e["data"]) == list(range(1, 7))
    ray_task = [e["data"] for e in events if e["data"] and "ray_task_id" in e["data"]]
    assert len(ray_task) == 1 and ray_task[0]["ray_node_id"] == ray.get_runtime_context().get_node_id()
    # the single server gets the very same files, to compare answers with
    archive = tarfile.open(fileobj=io.BytesIO(rh.get("/v1/adapters/trained/download").content))
    files = {m.name.rsplit("/", 1)[-1]: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    r = http.post("/v1/adapters", data={"name": "trained-on-ray"}, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 201, r.text
    try:
        served_on_both(rh, http, "trained", "trained-on-ray")
    finally:
        http.delete("/v1/adapters/trained-on-ray")


def retries(rh) -> float:
    return float(next(line.split()[-1] for line in rh.get("/metrics").text.splitlines()
                      if line.startswith("loraplex_replica_retries_total")))  # fmt: skip


def test_a_killed_replica_loses_no_request(rh):
    """The replica holding `alpha` gets more long requests than its 8 rows: some stream, some wait in its queue.
    Killed, the streaming ones end with an error event, the waiting ones (no token yet) are sent to the other."""
    victim = chat(rh, "alpha", max_tokens=1).headers[REPLICA]
    retried = retries(rh)
    long = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 110, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    bodies = [long | {"stream": i % 5 != 4} for i in range(20)]

    def send(body):
        if body["stream"]:
            return sse_lines(rh, "/v1/chat/completions", body)
        r = rh.post("/v1/chat/completions", json=body)
        return r.status_code, r.headers.get(REPLICA, ""), r.json()

    with ThreadPoolExecutor(len(bodies) + 3) as pool:
        running = [pool.submit(send, b) for b in bodies]
        time.sleep(0.5)
        ray.kill(ray.get_actor(engine_replicas()[victim], namespace="serve"), no_restart=True)
        after_kill = [pool.submit(send, long | {"max_tokens": 4, "stream": True}) for _ in range(3)]
        results = [f.result(timeout=120) for f in running]
        later = [f.result(timeout=120) for f in after_kill]
    cut = 0
    for (status, _, out), body in zip(results, bodies):
        if body["stream"]:  # streamed: all of it, or an error event then [DONE]
            assert status == 200 and out[-1] == "data: [DONE]", out[-3:]
            cut += any('"error"' in line for line in out)
        else:  # whole: all of it, or 503 if its replica died after generating began
            assert (status == 200 and out["choices"][0]["finish_reason"] == "length") or (
                status == 503 and out["error"]["type"] == "server_error"), out
    assert cut >= 1 and retries(rh) > retried  # the kill cut streams, and requests still queued went elsewhere
    for status, replica, out in later:  # sent after the kill: on the live replica (at once, or retried)
        assert status == 200 and replica != victim and out[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in out), out
    deadline = time.monotonic() + 120  # Serve replaces the dead replica
    while len(engine_replicas()) < 2 or victim in engine_replicas():
        assert time.monotonic() < deadline, engine_replicas()
        time.sleep(1)
    status = serve.status().applications["loraplex"].deployments["LoraplexEngine"].status
    while status != "HEALTHY":
        assert time.monotonic() < deadline, status
        time.sleep(1)
        status = serve.status().applications["loraplex"].deployments["LoraplexEngine"].status
    assert text(chat(rh, "alpha"))
