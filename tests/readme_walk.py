"""Walk README.md command by command, as a new user would, on the real default model (issue 17: "the README, walked
command by command on a fresh clone, works as written").

Every ```bash and ```python block of the README is split into commands (continuation lines and here-documents kept
whole). The walk starts the server as `make serve` does (`loraplex serve`, in the background, on a free port: the
README's 127.0.0.1:8000 is rewritten to it, and LORAPLEX_URL points the CLI at it), then runs each command in a
scratch folder holding what the README's commands name (`./peft-dir`, a PEFT adapter of the default model;
`facts.jsonl`, the 30 facts of `benchmarks/facts.py`; `hf://ORG/REPO` in a hub cache, offline), checking what each
must show: Paris at temperature 0, the adapter listed, the job succeeded, ≥ 90 % of the facts recalled by the
adapter the default job trained. `SKIPPED` names the commands the walk does not run, each with why;
`tests/test_readme.py` checks that every README command is walked or skipped (so none escapes), and runs the walk
when `LORAPLEX_WALK_README=1` (it trains twice on the real model: minutes).

    .venv/bin/python tests/readme_walk.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# command prefix → why the walk does not run it
SKIPPED = {
    "make serve": "the walk starts the same `loraplex serve` itself, in the background",
    "make test": "the test suite runs the walk (LORAPLEX_WALK_README=1), not the other way round",
    "make install TORCH_INDEX": "a CUDA machine",
    "docker ": "no docker here: tests/test_deploy.py checks the images and the compose file",
    "loraplex serve --api-keys-file": "a second server with keys: tests/hostile/test_tenants.py walks tenants",
    "loraplex serve --replicas": "a second server, on Ray Serve: tests/ray/test_cluster.py starts it for real",
    "loraplex serve --min-replicas": "a second server, on Ray Serve with autoscaling: tests/ray/test_app.py builds it",
    "RAY_ADDRESS=": "a running multi-node Ray cluster and a shared disk",
    "serve deploy": "a Ray cluster run with Ray's own tools",
}


def commands(text: str) -> list[tuple[str, str]]:
    """(language, command) for every command of the README's bash and python blocks, in order."""
    out = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if lang == "python":
            out.append((lang, body))
            continue
        lines, current, heredoc = body.splitlines(), [], None
        for line in lines:
            current.append(line)
            if heredoc is None and (m := re.search(r"<<'?(\w+)'?", line)):
                heredoc = m.group(1)
                continue
            if heredoc is not None:
                if line.strip() == heredoc:
                    heredoc = None
                else:
                    continue
            if line.rstrip().endswith("\\") or "\n".join(current).count("'") % 2:  # continued, or inside quotes
                continue
            command = "\n".join(current).strip()
            current = []
            if command and not command.startswith("#"):
                out.append((lang, command))
    return out


def skipped(command: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path, env: dict[str, str]) -> None:
    """What the README's commands name: ./peft-dir, facts.jsonl, and hf://ORG/REPO in an offline hub cache."""
    sys.path.insert(0, str(REPO))
    from benchmarks.facts import FACTS
    from server.engine.model import prepare_default_model
    from tests.tiny import make_peft_adapter

    model = prepare_default_model(Path(env["LORAPLEX_CACHE_DIR"]))
    make_peft_adapter(model, work / "peft-dir", "llama", r=8, alpha=16, seed=3, targets=["q_proj", "v_proj"],
                      scale=0.01)  # fmt: skip
    (work / "facts.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in FACTS))
    snapshot = work / "hub" / "models--ORG--REPO" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (work / "hub" / "models--ORG--REPO" / "refs").mkdir()
    (work / "hub" / "models--ORG--REPO" / "refs" / "main").write_text("0" * 40)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(work / "peft-dir" / f, snapshot / f)
    env |= {"HF_HUB_CACHE": str(work / "hub"), "HF_HUB_OFFLINE": "1"}


def check(command: str, out: str, work: Path, url: str) -> None:
    """What the README says each command shows."""
    if command.startswith("curl") and "chat/completions" in command:
        assert "Paris" in json.loads(out)["choices"][0]["message"]["content"], out
    elif command.startswith("loraplex jobs create"):
        assert out.strip().splitlines()[-1].startswith("succeeded in "), out
        recall_facts(url, "my-facts")
    elif command.startswith("loraplex adapters list"):
        assert "my-adapter" in out, out
    elif command.startswith("loraplex adapters download"):
        assert (work / "my-adapter-copy" / "adapter_model.safetensors").is_file()
    elif command.startswith("loraplex train"):
        assert (work / "my-adapter" / "adapter_config.json").is_file() and "completed" in out, out


def recall_facts(url: str, adapter: str) -> None:
    import httpx

    from benchmarks.facts import FACTS

    hits = 0
    for prompt, completion in FACTS:
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={"model": adapter, "prompt": prompt,
                                                                     "max_tokens": 12, "temperature": 0})
        hits += r.json()["choices"][0]["text"].strip().startswith(completion.strip())
    print(f"    {adapter} recalls {hits}/{len(FACTS)} facts", flush=True)
    assert hits >= 0.9 * len(FACTS), f"{adapter} recalls only {hits}/{len(FACTS)} facts"


def walk() -> None:
    work = Path(tempfile.mkdtemp(prefix="readme-walk-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")} | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LORAPLEX_URL": url, "LORAPLEX_PORT": str(port),
        "LORAPLEX_DATA_DIR": str(work / ".loraplex"), "LORAPLEX_CACHE_DIR": str(REPO / ".loraplex" / "cache"),
        "COLUMNS": "160",
    }  # fmt: skip
    prepare(work, env)
    server_log = (work / "server.log").open("w")
    server = subprocess.Popen(["loraplex", "serve"], cwd=work, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    job_id = None
    try:
        from tests.live import wait_ready

        wait_ready(server, url, timeout=600)
        log = (work / "server.log").read_text()
        assert re.search(r"start-up: loading", log) and re.search(r"ready in \d+ s", log), log
        for lang, command in commands(README.read_text()):
            if why := skipped(command):
                print(f"skip {command.splitlines()[0]}  ({why})", flush=True)
                continue
            command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            if job_id:
                command = command.replace("JOB_ID", job_id)
            print(f"run  {command.splitlines()[0]}", flush=True)
            started = time.monotonic()
            argv = [sys.executable, "-c", command] if lang == "python" else ["bash", "-c", command]
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            if command.startswith("loraplex jobs create"):
                job_id = done.stdout.split()[0]
            check(command, done.stdout, work, url)
            print(f"     ok in {time.monotonic() - started:.0f} s", flush=True)
    finally:
        server.terminate()
        server.wait(60)
        server_log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    walk()
