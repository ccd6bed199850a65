"""Scale-out on Ray Serve: replicas, their resources, autoscaling, the shared adapter store; importable without ray
(server.settings reads it, and `loraplex serve` without `--replicas` never imports ray)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    replicas: int | None = Field(None, ge=1)
    """Serve through Ray Serve with this many engine replicas (joins the cluster in RAY_ADDRESS, else starts a local
    one); unset: one process, no Ray."""
    min_replicas: int | None = Field(None, ge=0)
    """Autoscaling: fewest engine replicas (with max_replicas; replaces a fixed --replicas count)."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling: most engine replicas."""
    target_ongoing_requests: float | None = Field(None, gt=0)
    """Autoscaling: requests per engine replica that Serve aims for (default: max_num_seqs, one running batch)."""
    replica_num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each engine replica."""
    replica_num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each engine replica (1 to give each its own GPU)."""
    job_num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each training job's task."""
    job_num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each training job's task (with training_device=cuda)."""
    adapter_store: str | None = None
    """Where replicas read adapters: a directory every node mounts, or an fsspec URI (e.g. s3://bucket/adapters);
    default: <data_dir>/adapters."""
    adapter_affinity: bool = True
    """Route each request to a replica that holds its adapter (Serve's multiplexed model ids, `AdapterAffinityRouter`);
    off: by queue length only (the less loaded of two random replicas, as Serve's default router)."""
    serve_throughput_optimized: bool = True
    """A local Ray instance that `--replicas` starts runs Ray Serve's throughput-optimized mode
    (RAY_SERVE_THROUGHPUT_OPTIMIZED: gRPC between deployments, user code and router on each replica's event loop,
    the garbage collector frozen after start-up; its direct ingress off: requests come in through Serve's proxy on
    --port). A cluster in RAY_ADDRESS keeps its own (set those variables where it starts)."""
    max_adapters_per_replica: int | None = Field(None, ge=1)
    """Adapters (or adapter sets) one replica keeps loaded for routing; default: what its LoRA pool holds at
    max_lora_rank."""

    @model_validator(mode="after")
    def _check_autoscaling(self) -> ClusterConfig:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas and max_replicas go together")
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas must be <= max_replicas ({self.min_replicas} > {self.max_replicas})")
        return self

    @property
    def clustered(self) -> bool:
        """Whether to serve through Ray Serve."""
        return self.replicas is not None or self.max_replicas is not None
