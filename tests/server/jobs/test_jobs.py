"""Training jobs through a real server: files, create → succeeded → servable, events (list and SSE),
cancel, limits, a restart during a job, a worker that dies, and the job store's state machine."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from server.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from tests.live import start_server, tiny_settings

FACTS = [("Hello", " world!"), ("The capital of France is", " Paris."), ("LoRA adapters are", " small."),
         ("How are you", " today?"), ("I am", " fine, thank you.")]


def jsonl(lines: list) -> bytes:
    return ("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n").encode()


TRAIN = jsonl([{"prompt": p, "completion": c} for p, c in FACTS]
              + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world!"}]}])


def upload(http: httpx.Client, data: bytes = TRAIN, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return http.post("/v1/files", files={"file": (name, data, "application/jsonl")}, data={"purpose": purpose})


def create(http: httpx.Client, file_id: str, adapter: str, method: str = "lora", **hp):
    body = {"training_file": file_id, "adapter_name": adapter, "seed": 0,
            "method": {"type": method, "hyperparameters": {"rank": 4, "learning_rate": 1e-2, "batch_size": 3} | hp}}
    return http.post("/v1/fine_tuning/jobs", json=body)


def wait(http: httpx.Client, job_id: str, until, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"timed out; job is {job['status']}"
        time.sleep(0.1)


def finished(job: dict) -> bool:
    return job["status"] in (SUCCEEDED, FAILED, CANCELLED)


def events(http: httpx.Client, job_id: str) -> list[dict]:
    return http.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]


def greedy(http: httpx.Client, model: str, prompt: str = "The capital of France is") -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


SERVER_SETTINGS = dict(max_train_steps=5000, max_training_file_bytes=64 * 1024, training_threads=1)


@pytest.fixture
def http(client):
    return client


@pytest.fixture(scope="module")
def train_file(server) -> str:
    with httpx.Client(base_url=server.url) as c:
        r = upload(c)
    assert r.status_code == 200, r.text
    return r.json()["id"]


# --- files ---------------------------------------------------------------------------------


def test_file_upload_show_list_content_delete(http, train_file):
    f = http.get(f"/v1/files/{train_file}").json()
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["bytes"] == len(TRAIN)
    assert train_file in [x["id"] for x in http.get("/v1/files").json()["data"]]
    assert http.get(f"/v1/files/{train_file}/content").content == TRAIN
    other = upload(http).json()["id"]
    assert http.delete(f"/v1/files/{other}").json()["deleted"] is True
    assert http.get(f"/v1/files/{other}").status_code == 404


def test_bad_files_are_refused_with_line_numbers_and_nothing_kept(http, server):
    before = http.get("/v1/files").json()["data"]
    bad = jsonl([{"prompt": "a", "completion": "b"}, "{not json", {"prompt": "a"},
                 {"messages": [{"role": "user", "content": "no answer"}]}, {"prompt": "x", "completion": "y"}])
    r = upload(http, bad)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg and "line 1:" not in msg and "line 5" not in msg
    assert upload(http, b"\xff\xfe garbage").status_code == 400
    assert upload(http, b"\n\n").status_code == 400  # no examples
    assert upload(http, purpose="assistants").status_code == 400
    too_big = upload(http, jsonl([{"prompt": "x" * 1000, "completion": "y"}] * 100))
    assert too_big.status_code == 413 and "error" in too_big.json()
    assert http.get("/v1/files").json()["data"] == before
    files_dir = server.state.settings.data_dir / "files"
    assert sorted(p.name for p in files_dir.iterdir()) == sorted(f"{f['id']}.jsonl" for f in before)


# --- creation checks -------------------------------------------------------------------------


def test_job_creation_reports_every_problem_at_once(http, train_file):
    n_jobs = len(http.get("/v1/fine_tuning/jobs").json()["data"])
    body = {"training_file": "file-nope", "validation_file": "file-nope2", "adapter_name": "../bad",
            "method": {"type": "lora", "hyperparameters": {"rank": 999, "target_modules": ["q_proj", "wte"]}}}
    r = http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    for part in ("adapter_name", "training_file", "validation_file", "rank 999", "wte"):
        assert part in msg, (part, msg)
    r = create(http, train_file, "toolong", n_epochs=100000)
    assert r.status_code == 400 and "optimizer steps" in r.json()["error"]["message"]
    r = create(http, train_file, "sw", "switchlora", switch_interval=4, switch_warm_steps=5, dropout=0.1)
    assert r.status_code == 400 and "switch_interval" in r.json()["error"]["message"]
    assert "dropout" in r.json()["error"]["message"]
    r = create(http, train_file, "sw", "switchlora", switch_init="orthogonal")
    assert r.status_code == 422 and "switch_init" in r.json()["error"]["message"]
    r = create(http, train_file, "typo", learning_rte=0.1)
    assert r.status_code == 422 and "learning_rte" in r.json()["error"]["message"]
    r = http.post("/v1/fine_tuning/jobs", json={"training_file": train_file, "adapter_name": "x", "max_seconds": 1e9})
    assert r.status_code == 400 and "max_seconds" in r.json()["error"]["message"]
    r = http.post("/v1/fine_tuning/jobs", json={"training_file": train_file, "adapter_name": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
    assert len(http.get("/v1/fine_tuning/jobs").json()["data"]) == n_jobs


# --- the whole path ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "switchlora"])
def test_job_trains_a_servable_adapter(http, train_file, method):
    name = f"trained-{method}"
    base_answer = greedy(http, "llama")
    hp = {"max_steps": 30, "checkpoint_every": 10}
    if method == "switchlora":
        hp |= {"switch_interval": 10, "switch_warm_steps": 2, "learning_rate": 2e-2}
    r = create(http, train_file, name, method, **hp)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] in (QUEUED, RUNNING) and job["adapter_name"] == name
    job = wait(http, job["id"], finished)
    assert job["status"] == SUCCEEDED, job["error"]
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["started_at"] and job["fine_tuned_model"] == name
    steps = [e["data"] for e in events(http, job["id"]) if e["data"] and "loss" in e["data"]]
    assert [s["step"] for s in steps] == list(range(1, 31))
    assert min(s["loss"] for s in steps[-5:]) < steps[0]["loss"]
    assert all({"learning_rate", "trained_tokens"} <= s.keys() for s in steps)
    # servable at once, with the same validation as an upload
    assert name in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.get(f"/v1/adapters/{name}").json()["rank"] == 4
    assert greedy(http, name) != base_answer
    if method == "switchlora":
        assert 0 < job["metrics"]["energy_retained"] <= 1
    # a second job for a name that now exists is refused
    assert create(http, train_file, name).status_code == 409


def test_event_stream_follows_a_job_to_done(http, train_file):
    job = create(http, train_file, "streamed", max_steps=8).json()
    seen = []
    with http.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(line[6:])
    assert seen[-1] == "[DONE]"
    payloads = [json.loads(s) for s in seen[:-1]]
    assert [p["data"]["step"] for p in payloads if p["data"] and "loss" in p["data"]] == list(range(1, 9))
    assert "succeeded" in payloads[-1]["message"]
    assert http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == SUCCEEDED
    page = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 3}).json()
    assert len(page["data"]) == 3 and page["has_more"]
    after = page["data"][-1]["id"].split("-")[1]
    rest = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": after}).json()["data"]
    assert len(page["data"]) + len(rest) == len(payloads)


def test_cancel_running_and_queued_jobs(http, train_file, server):
    running = create(http, train_file, "long-one", max_steps=4000).json()
    queued = create(http, train_file, "waiting-one", max_steps=10).json()
    wait(http, running["id"], lambda j: j["metrics"].get("step", 0) >= 2)
    assert http.get(f"/v1/fine_tuning/jobs/{queued['id']}").json()["status"] == QUEUED  # one job at a time
    r = http.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == CANCELLED
    t0 = time.monotonic()
    r = http.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
    assert r.status_code == 200, r.text
    job = wait(http, running["id"], finished, timeout=30)
    assert job["status"] == CANCELLED and time.monotonic() - t0 < 15
    last_step = job["metrics"]["step"]
    assert last_step < 4000 and "cancelled" in events(http, running["id"])[-1]["message"]
    assert http.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel").status_code == 409
    assert "long-one" not in [a["id"] for a in http.get("/v1/adapters").json()["data"]]
    assert not (server.state.settings.data_dir / "jobs" / running["id"]).exists()  # work files removed


def test_a_worker_that_dies_fails_its_job_with_the_reason(http, train_file, server):
    job = create(http, train_file, "doomed", max_steps=4000).json()
    wait(http, job["id"], lambda j: j["metrics"].get("step", 0) >= 1)
    os.kill(server.state.job_service.supervisor.active[job["id"]].process.pid, signal.SIGKILL)
    job = wait(http, job["id"], finished, timeout=30)
    assert job["status"] == FAILED and "exited unexpectedly" in job["error"]["message"]
    # the runner goes on: the next job trains
    nxt = create(http, train_file, "after-crash", max_steps=3).json()
    assert wait(http, nxt["id"], finished)["status"] == SUCCEEDED


def test_wall_clock_limit_fails_the_job(http, train_file):
    body = {"training_file": train_file, "adapter_name": "slow", "max_seconds": 2,
            "method": {"hyperparameters": {"rank": 4, "max_steps": 4000, "batch_size": 3}}}
    job = http.post("/v1/fine_tuning/jobs", json=body).json()
    job = wait(http, job["id"], finished, timeout=60)
    assert job["status"] == FAILED and "wall-clock limit of 2 s" in job["error"]["message"]
    assert 0 < job["metrics"]["step"] < 4000


def test_wall_clock_limit_holds_for_a_worker_that_cannot_check_it(tmp_path, llama_dir):
    """The worker checks its budget between optimizer steps; one that is stuck (here: stopped by SIGSTOP) is killed
    by the runner `drain_timeout` seconds past the limit, and the job fails with the reason."""
    live = start_server(tiny_settings(llama_dir, tmp_path, max_train_steps=5000, training_threads=1, drain_timeout=2))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            f = upload(c).json()["id"]
            body = {"training_file": f, "adapter_name": "stuck", "max_seconds": 3,
                    "method": {"hyperparameters": {"rank": 4, "max_steps": 4000, "batch_size": 3}}}
            job = c.post("/v1/fine_tuning/jobs", json=body).json()
            wait(c, job["id"], lambda j: j["status"] == RUNNING)
            os.kill(live.state.job_service.supervisor.active[job["id"]].process.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            job = wait(c, job["id"], finished, timeout=30)
            assert job["status"] == FAILED and "wall-clock limit of 3 s" in job["error"]["message"]
            assert "was stopped" in job["error"]["message"] and time.monotonic() - t0 < 10
    finally:
        live.stop()


def test_metrics_count_jobs_by_status(http, train_file):
    text = http.get("/metrics").text
    assert 'loraplex_training_jobs{status="succeeded"}' in text


# --- client and CLI ----------------------------------------------------------------------------


def test_client_drives_a_job(server, tmp_path):
    from client import LoraplexClient

    path = tmp_path / "train.jsonl"
    path.write_bytes(TRAIN)
    with LoraplexClient(server.url) as c:
        f = c.upload_file(path)
        hp = {"rank": 4, "max_steps": 5, "batch_size": 3, "learning_rate": 1e-2}
        job = c.create_job(f.id, "via-client", {"type": "lora", "hyperparameters": hp}, seed=1)
        seen = []
        done = c.wait_job(job.id, poll_interval=0.1, timeout=120, on_update=seen.append)
        assert done.status == SUCCEEDED and seen[-1].status == SUCCEEDED
        streamed = list(c.stream_job_events(job.id))
        assert [e.data["step"] for e in streamed if e.data and "loss" in e.data] == [1, 2, 3, 4, 5]
        assert [e.message for e in c.job_events(job.id)] == [e.message for e in streamed]
        assert "via-client" in [a.id for a in c.list_adapters()]


def test_cli_jobs_commands(server, tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    runner, url = CliRunner(), ["--url", server.url]
    path = tmp_path / "train.jsonl"
    path.write_bytes(TRAIN)
    files_before = [f["id"] for f in httpx.get(f"{server.url}/v1/files").json()["data"]]
    r = runner.invoke(app, ["jobs", "create", str(path), "-n", "via-cli", "--set", "max_steps=4", "--set", "rank=4",
                            "--set", "batch_size=3", "--seed", "3", "--wait", *url], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    job_id = r.output.split()[0]
    assert job_id.startswith("ftjob-")
    assert "4/4" in r.output and "ETA" in r.output and re.search(r"\d:\d\d:\d\d", r.output)  # steps, elapsed, ETA
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  Training started", r.output)  # events with their time
    summary = r.output.strip().splitlines()[-1]
    assert summary.startswith("succeeded in ") and "4 steps" in summary and "'via-cli' is servable" in summary
    job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}").json()
    # the bar, the summary and `jobs list` show one loss: the mean of the last steps, as the job's metrics keep it
    assert f"loss {job['metrics']['train_loss']:.4f}" in summary
    r = runner.invoke(app, ["jobs", "list", *url], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "via-cli" in r.output and f"{job['metrics']['train_loss']:.4f}" in r.output
    r = runner.invoke(app, ["jobs", "list", "--json", *url])
    assert job_id in [j["id"] for j in json.loads(r.output)]
    r = runner.invoke(app, ["jobs", "show", job_id, *url])
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "succeeded"
    r = runner.invoke(app, ["jobs", "events", job_id, *url])
    assert r.exit_code == 0 and "Step 4/4" in r.output and re.search(r"^\d{4}-\d\d-\d\d ", r.output, re.M)
    r = runner.invoke(app, ["jobs", "cancel", job_id, *url])
    assert r.exit_code == 1 and "succeeded" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = runner.invoke(app, ["jobs", "create", str(bad), "-n", "nope", *url])
    assert r.exit_code == 1 and "line 1" in r.output
    # a create the server refuses leaves none of the files it uploaded behind
    r = runner.invoke(app, ["jobs", "create", str(path), "--validation-file", str(path), "-n", "../bad", *url])
    assert r.exit_code == 1 and "adapter_name" in r.output
    files_after = [f["id"] for f in httpx.get(f"{server.url}/v1/files").json()["data"]]
    assert len(files_after) == len(files_before) + 1  # only the succeeded job's training file


def test_cli_trains_offline(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from adapters.peft_io import load_peft_adapter
    from server.cli import app

    path = tmp_path / "train.jsonl"
    path.write_bytes(TRAIN)
    r = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "out"), "--max-steps", "6", "--rank",
                                 "4", "--batch-size", "3", "--learning-rate", "0.01"],
                           env={"LORAPLEX_MODEL": str(llama_dir), "LORAPLEX_DATA_DIR": str(tmp_path / "data")})
    assert r.exit_code == 0, r.output  # the model the server is configured with (LORAPLEX_MODEL)
    assert "completed" in r.output
    assert load_peft_adapter(tmp_path / "out", None, None).rank == 4


def test_cli_train_uses_the_servers_converted_model(tmp_path, monkeypatch):
    """`loraplex train` finds the default model where `loraplex serve` converted it (LORAPLEX_DATA_DIR), instead of
    converting it again into ./.loraplex (issue 17)."""
    from typer.testing import CliRunner

    import server.engine.model as model
    from server.cli import app

    seen = []
    monkeypatch.setattr(model, "prepare_default_model", lambda cache_dir, *a: seen.append(cache_dir) or tmp_path / "x")
    path = tmp_path / "train.jsonl"
    path.write_bytes(TRAIN)
    CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "out"), "--max-steps", "1"],
                       env={"LORAPLEX_DATA_DIR": str(tmp_path / "served")})
    assert seen == [tmp_path / "served" / "cache"]


# --- restarts ----------------------------------------------------------------------------------


def test_restart_during_a_job_resumes_from_its_checkpoint(tmp_path, llama_dir):
    settings = tiny_settings(llama_dir, tmp_path, training_threads=1)
    live = start_server(settings)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            file_id = upload(c).json()["id"]
            job = create(c, file_id, "resumed", max_steps=400, checkpoint_every=5).json()
            wait(c, job["id"], lambda j: j["metrics"].get("step", 0) >= 12)
    finally:
        live.stop()  # graceful: the worker checkpoints, the job goes back to the queue
    store = JobStore(tmp_path / "jobs.db")
    paused = store.get_job(job["id"])
    store.close()
    assert paused.status == QUEUED and paused.metrics["step"] >= 12
    live = start_server(settings)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            done = wait(c, job["id"], finished, timeout=300)
            assert done["status"] == SUCCEEDED, done["error"]
            steps = [e["data"]["step"] for e in events(c, job["id"]) if e["data"] and "loss" in e["data"]]
            assert steps[-1] == 400 and steps.count(1) == 1  # resumed from the checkpoint, not from step 1
            assert "resumed" in [m["id"] for m in c.get("/v1/models").json()["data"]]
    finally:
        live.stop()


def test_job_left_running_by_a_dead_server(tmp_path, llama_dir):
    """A database left by a server that died: a running job with a checkpoint resumes, one without fails."""
    store = JobStore(tmp_path / "jobs.db")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-x.jsonl").write_bytes(TRAIN)
    kw = dict(method={"type": "lora", "hyperparameters": {"rank": 4, "max_steps": 3, "batch_size": 3}},
              training_file="file-x", validation_file=None, seed=0, total_steps=3, max_seconds=600)
    lost = store.add_job(adapter_name="lost", **kw)
    store.transition(lost.id, RUNNING, started_at=int(time.time()))
    store.close()
    live = start_server(tiny_settings(llama_dir, tmp_path))
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            job = wait(c, lost.id, finished)
            assert job["status"] == FAILED and "checkpoint" in job["error"]["message"]
    finally:
        live.stop()


# --- the store ---------------------------------------------------------------------------------


def test_file_in_use_cannot_be_deleted(http, train_file):
    job = create(http, train_file, "holder", max_steps=4000).json()
    r = http.delete(f"/v1/files/{train_file}")
    assert r.status_code == 409
    http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert wait(http, job["id"], finished)["status"] == CANCELLED

