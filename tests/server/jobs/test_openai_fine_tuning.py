"""The official `openai` SDK's fine-tuning calls against a live server, unchanged (API.md, Training jobs); and every
kind of adapter this server serves (a folder's, an upload's, a LoRA job's, a SwitchLoRA job's) downloads as files
that load in `peft` with every tensor in place."""

from __future__ import annotations

import io
import json
import tarfile
import time

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.live import start_server, tiny_settings
from tests.tiny import make_peft_adapter

FACTS = [("Hello", " world!"), ("The capital of France is", " Paris."), ("LoRA adapters are", " small."),
         ("How are you", " today?"), ("I am", " fine, thank you."), ("The sky is", " blue.")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_dir, adapter_dir):
    live = start_server(tiny_settings(llama_dir, tmp_path_factory.mktemp("data"), adapter_dir=adapter_dir,
                                      training_threads=1))  # fmt: skip
    yield live
    live.stop()


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def files(sdk, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in FACTS))
    val.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in FACTS[:2]))
    with train.open("rb") as t, val.open("rb") as v:
        return sdk.files.create(file=t, purpose="fine-tune").id, sdk.files.create(file=v, purpose="fine-tune").id


def wait(sdk: openai.OpenAI, job_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (job := sdk.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(0.2)
    return job


def test_the_sdk_drives_a_supervised_job(sdk, files):
    train, val = files
    job = sdk.fine_tuning.jobs.create(
        model="llama", training_file=train, validation_file=val, suffix="sdk-facts", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 5, "checkpoint_every": 3}}},  # ours: the last
    )  # fmt: skip
    assert job.object == "fine_tuning.job" and job.model == "llama" and job.status in ("queued", "running")
    assert job.method.type == "supervised" and job.fine_tuned_model is None
    hp = job.method.supervised.hyperparameters
    assert hp.n_epochs == 3 and hp.batch_size == 2
    assert not [k for k in job.hyperparameters.model_extra if k.startswith("switch_") or k == "export_rank"]
    job = wait(sdk, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "sdk-facts" and job.model == "llama" and job.trained_tokens > 0
    assert job.id in [j.id for j in sdk.fine_tuning.jobs.list()]
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events and all(isinstance(e.created_at, int) and e.created_at >= job.created_at for e in events)
    assert any("Step 9/9" in e.message for e in events)
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [9, 9, 6, 3]  # newest first; the exported adapter first of all
    assert checkpoints[0].fine_tuned_model_checkpoint == "sdk-facts"
    assert all(c.metrics.train_loss > 0 and c.fine_tuning_job_id == job.id for c in checkpoints)
    assert checkpoints[0].metrics.valid_loss == pytest.approx(job.model_extra["metrics"]["eval_loss"])
    # the adapter serves at once under the suffix
    answer = sdk.completions.create(model="sdk-facts", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert answer.model == "sdk-facts"


def test_the_sdk_names_cancels_and_is_refused(sdk, files):
    train, _ = files
    job = sdk.fine_tuning.jobs.create(model="llama", training_file=train,
                                      hyperparameters={"n_epochs": 200, "batch_size": 1})  # fmt: skip
    assert job.model_extra["adapter_name"].startswith("ft-")  # no suffix: a name is made up, as OpenAI does
    assert job.hyperparameters.n_epochs == 200
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("cancelled", "running")
    assert wait(sdk, job.id).status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train)
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model="llama", training_file=train, suffix="a", extra_body={"adapter_name": "b"})
    assert "suffix" in str(e.value)


# --- every served adapter kind downloads as files that load in peft --------------------------


def peft_lora_state(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The LoRA tensors PEFT holds after loading `adapter_dir`, keyed as in the safetensors file."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    return {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}


def test_every_served_adapter_downloads_as_files_peft_loads(server, sdk, files, llama_dir, tmp_path):
    odd = make_peft_adapter(llama_dir, tmp_path / "odd", "llama", r=4, alpha=8, seed=5, targets=["q_proj", "v_proj"],
                            rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 3}, use_rslora=True)  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as http:
        files_of = {f: (f, (odd / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
        assert http.post("/v1/adapters", data={"name": "uploaded"}, files=files_of).status_code == 201
        switch = sdk.fine_tuning.jobs.create(model="llama", training_file=files[0], suffix="switched", extra_body={
            "method": {"type": "switchlora", "hyperparameters": {"max_steps": 6, "rank": 4, "export_rank": 2,
                                                                  "switch_interval": 4, "switch_warm_steps": 1}}})  # fmt: skip
        assert wait(sdk, switch.id).status == "succeeded"
        names = {a["id"] for a in http.get("/v1/adapters").json()["data"]}
        assert {"alpha", "beta", "uploaded", "switched", "sdk-facts"} <= names  # folder, upload, lora and switchlora jobs
        for name in sorted(names):
            r = http.get(f"/v1/adapters/{name}/download")
            assert r.status_code == 200
            with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
                t.extractall(tmp_path / "dl", filter="data")
            tensors = load_file(tmp_path / "dl" / name / "adapter_model.safetensors")
            loaded = peft_lora_state(llama_dir, tmp_path / "dl" / name)
            assert loaded.keys() == tensors.keys(), name  # no module PEFT made up, none it left out
            for key, t in tensors.items():
                torch.testing.assert_close(loaded[key], t, msg=f"{name}: {key}")
