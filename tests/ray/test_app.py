"""The Serve application's options come from the settings; `loraplex serve` offers them and explains what is missing.

No cluster here: building an application only describes it."""

from __future__ import annotations

import os
import sys

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from server.cli import app as cli
from server.settings import Settings

pytest.importorskip("ray")

from server.ray.app import (  # noqa: E402
    SERVE_THROUGHPUT_ENV,
    build_app,
    engine_options,
    environment,
    replica_capacity,
    resolved,
)
from server.ray.replica import AdapterRef, set_id  # noqa: E402
from server.ray.routing import AdapterAffinityRouter  # noqa: E402


def test_engine_options_follow_the_settings(tmp_path):
    fixed = engine_options(Settings(data_dir=tmp_path, replicas=3, max_num_seqs=16, max_waiting=100,
                                    replica_num_cpus=2, replica_num_gpus=1))  # fmt: skip
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 116  # the engine's batch and queue, not Serve's default of 5
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert fixed["request_router_config"].request_router_class == f"{AdapterAffinityRouter.__module__}.AdapterAffinityRouter"
    scaled = engine_options(Settings(data_dir=tmp_path, min_replicas=1, max_replicas=4, target_ongoing_requests=12))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 12}
    assert "num_replicas" not in scaled
    assert engine_options(Settings(data_dir=tmp_path, min_replicas=0, max_replicas=2))["autoscaling_config"][
        "target_ongoing_requests"] == 32  # one running batch
    for bad in ({"min_replicas": 1}, {"min_replicas": 3, "max_replicas": 2}, {"replicas": 0}):
        with pytest.raises(ValidationError, match="replicas"):
            Settings(data_dir=tmp_path, **bad)


def test_capacity_is_what_the_lora_pool_holds(tmp_path):
    assert replica_capacity(Settings(data_dir=tmp_path, lora_pages=128, lora_page_size=16, max_lora_rank=64)) == 31
    assert replica_capacity(Settings(data_dir=tmp_path, lora_pages=16, lora_page_size=8, max_lora_rank=16)) == 7
    assert replica_capacity(Settings(data_dir=tmp_path, max_adapters_per_replica=5)) == 5


def test_paths_are_made_absolute_for_replicas_elsewhere(tmp_path, monkeypatch, llama_dir):
    monkeypatch.chdir(llama_dir.parent)
    s = resolved(Settings(data_dir="data", model=llama_dir.name, adapter_dir="ads"))
    assert s.data_dir == llama_dir.parent / "data" and s.model == str(llama_dir) and s.adapter_dir.is_absolute()
    application = build_app(Settings(data_dir=tmp_path, model=str(llama_dir), replicas=2))
    assert application is not None


def test_multiplexed_ids():
    a, b = AdapterRef("a@1.0123456789abcdef"), AdapterRef("b@2.fedcba9876543210", 0.5)
    assert set_id([]) == "" and set_id([a]) == a.version_id  # the base model: any replica; one adapter: its version
    assert set_id([a, b]) == set_id([AdapterRef(a.version_id), AdapterRef(b.version_id, 0.5)])  # stable
    assert set_id([a, b]).startswith("set:") and set_id([a, b]) != set_id([b, a])
    assert set_id([AdapterRef(a.version_id, 0.5)]) != set_id([a])  # a weight is a different composition


def test_serve_offers_the_cluster_options_and_says_what_is_missing(monkeypatch):
    runner = CliRunner()
    help_text = runner.invoke(cli, ["serve", "--help"]).output
    for option in ("--replicas", "--min-replicas", "--max-replicas", "--adapter-store", "--job-num-gpus"):
        assert option in help_text
    r = runner.invoke(cli, ["serve", "--min-replicas", "1"])
    assert r.exit_code == 2 and "min_replicas and max_replicas go together" in r.output
    for name in [m for m in sys.modules if m == "ray" or m.startswith(("ray.", "server.ray."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    r = runner.invoke(cli, ["serve", "--replicas", "2"])
    assert r.exit_code == 2 and "pip install 'loraplex[ray]'" in r.output


def test_the_example_serve_config_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tests.live import REPO

    config = yaml.safe_load((REPO / "server" / "ray" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "server.ray.app:build"
    assert Settings(**application["args"]).clustered  # every arg is a setting loraplex knows


def test_the_serve_mode_variables_are_set_for_ray_init_only_where_the_user_set_none(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")  # the user's choice
    with environment(SERVE_THROUGHPUT_ENV):
        assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in os.environ and os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
