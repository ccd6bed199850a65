"""The deployment kit (docker/, .dockerignore), checked without docker: the images are runtime-only with a volume and
a health check and agree with each other; the compose file runs the server with Prometheus and a provisioned
Grafana dashboard; every metric the dashboard and Prometheus use is one a real server exports."""

from __future__ import annotations

import json
import re

import yaml

from tests.live import REPO

DOCKER = REPO / "docker"


def stages(dockerfile: str) -> list[list[str]]:
    """The instructions of each stage (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / dockerfile).read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def test_images_are_runtime_only_with_a_volume_and_a_health_check():
    final = {}
    for name in ("Dockerfile", "Dockerfile.cuda"):
        build, runtime = stages(name)
        assert any(i.startswith("RUN make install EXTRAS=") for i in build)  # no test extras in the image
        text = " ".join(runtime)
        assert "gcc" not in text and "make install" not in text  # no compilers in the image that runs
        assert "COPY --from=build /app /app" in runtime and "VOLUME /data" in runtime and "USER loraplex" in runtime
        health = next(i for i in runtime if i.startswith("HEALTHCHECK"))
        assert "/health/ready" in health and "--start-period=" in health
        final[name] = [i for i in runtime if i.startswith(("HEALTHCHECK", "VOLUME", "EXPOSE", "CMD", "COPY"))]
        env = next(i for i in runtime if i.startswith("ENV LORAPLEX_HOST"))
        assert "LORAPLEX_DATA_DIR=/data" in env and "LORAPLEX_HOST=0.0.0.0" in env
        # the CPU image maps its caches in at start (on CUDA they are allocated whole anyway)
        assert ("LORAPLEX_RESERVE_MEMORY=true" in env) == (name == "Dockerfile")
    assert final["Dockerfile"] == final["Dockerfile.cuda"]  # the two images agree


def test_dockerignore_keeps_environments_data_and_history_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".loraplex", "tests"} <= ignored
    for copied in ("server", "adapters", "client", "Makefile", "pyproject.toml", "constraints.txt"):
        assert copied not in ignored


def test_compose_runs_the_server_prometheus_and_a_provisioned_grafana():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"loraplex", "prometheus", "grafana"}
    server = services["loraplex"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile" and "loraplex-data:/data" in server["volumes"]
    assert server["environment"]["LORAPLEX_METRICS_ACCESS"] == "open"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["loraplex:8000"]
    source = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/loraplex.yaml").read_text())["providers"][0]
    mount = next(v for v in services["grafana"]["volumes"] if v.startswith("./grafana/dashboards"))
    assert mount.split(":")[1] == provider["options"]["path"]


def test_the_dashboard_shows_what_the_server_exports(http):
    http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
    exported = set(re.findall(r"^# TYPE (\S+)", http.get("/metrics").text, re.M))
    exported |= {n.removesuffix("_total") for n in exported}
    dashboard = json.loads((DOCKER / "grafana/dashboards/loraplex.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|total)$", "", m) for e in exprs for m in re.findall(r"loraplex_[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported
    for wanted in ("loraplex_e2e_request_latency_seconds", "loraplex_kv_cache_usage_ratio",
                   "loraplex_lora_pool_usage_ratio", "loraplex_training_loss", "loraplex_adapter_merged",
                   "loraplex_adapter_generation_tokens", "loraplex_time_to_first_token_seconds"):  # fmt: skip
        assert wanted in used, wanted
    assert all(p["datasource"]["uid"] == "prometheus" for p in dashboard["panels"])
