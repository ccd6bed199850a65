"""The shared adapter store: versions appear whole, the previous version stays for requests in flight, deletes are
at once, and version ids never alias; on a local directory and on a remote fsspec filesystem (`memory://` stands in
for an object store)."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from adapters.tiers.store import AdapterStore
from server.ray.store import SharedStore, digest_of, parse_version_id


@pytest.fixture(params=["local", "remote"])
def store(request, tmp_path) -> SharedStore:
    uri = str(tmp_path / "store") if request.param == "local" else f"memory://loraplex-{uuid.uuid4().hex}"
    s = SharedStore(uri, tmp_path / "cache")
    assert s.is_local == (request.param == "local")
    return s


def stage(store: SharedStore, src) -> object:
    d = store.scratch_dir() / "adapter"
    shutil.copytree(src, d)
    return d


def test_versions_overwrite_prune_delete(store, adapter_dir):
    assert store.current("x") is None and store.list() == []
    v1 = store.save("x", stage(store, adapter_dir / "alpha"), 1)
    assert store.current("x") == v1 and v1.rank == 4 and v1.digest == digest_of(adapter_dir / "alpha")
    assert parse_version_id(v1.version_id) == ("x", 1, v1.digest)
    v2 = store.save("x", stage(store, adapter_dir / "beta"), 2)
    store.prune("x", 2)
    assert store.current("x") == v2 and v2.rank == 8 and v2.digest != v1.digest
    assert store.get("x", 1) == v1  # kept for a request that resolved it just before the overwrite
    v3 = store.save("x", stage(store, adapter_dir / "alpha"), 3)
    store.prune("x", 3)
    assert store.get("x", 1) is None and store.versions("x") == [2, 3] and [s.name for s in store.list()] == ["x"]
    copy = store.local_copy(v3)
    assert (copy / "adapter_model.safetensors").read_bytes() == (adapter_dir / "alpha" / "adapter_model.safetensors").read_bytes()
    store.delete("x")
    assert store.current("x") is None and store.versions("x") == [] and store.list() == []
    again = store.save("x", stage(store, adapter_dir / "beta"), 1)
    assert again.version == 1 and again.version_id != v1.version_id  # same number, other files: another id


def test_a_version_without_its_meta_file_does_not_exist(store, adapter_dir):
    v1 = store.save("x", stage(store, adapter_dir / "alpha"), 1)
    half = f"{store.root}/x/2"  # a writer that stopped before its meta.json
    store.fs.makedirs(half, exist_ok=True)
    store.fs.pipe_file(f"{half}/adapter_config.json", b"{}")
    assert store.current("x") == v1 and store.get("x", 2) is None


def test_reads_what_the_single_process_server_stored(tmp_path, adapter_dir):
    disk = AdapterStore(tmp_path / "adapters")
    scratch = disk.scratch_dir()
    shutil.copytree(adapter_dir / "beta", scratch, dirs_exist_ok=True)
    disk.save("b", scratch, 1)
    stored = SharedStore(tmp_path / "adapters", tmp_path / "cache").current("b")
    assert (stored.version, stored.rank, stored.target_modules) == (1, 8, ["q_proj", "v_proj"])
    assert stored.digest == digest_of(adapter_dir / "beta")
    # and the single-process server reads what the shared store wrote (its extra meta fields are ignored)
    shared = SharedStore(tmp_path / "adapters", tmp_path / "cache")
    shared.save("a", stage(shared, adapter_dir / "alpha"), 1)
    assert "digest" in json.loads((tmp_path / "adapters" / "a" / "1" / "meta.json").read_text())
    assert {s.name for s in AdapterStore(tmp_path / "adapters").load_all()} == {"a", "b"}


@pytest.fixture(scope="module")
def shapes(llama_dir) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    from adapters.targets import adaptable_layers, layer_shape

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return {name: layer_shape(layer) for name, layer in adaptable_layers(model).items()}


@pytest.mark.asyncio
async def test_the_catalog_is_the_store(store, adapter_dir, shapes, tiny_models, tmp_path):
    from adapters.peft_io import AdapterError
    from adapters.tiers.registry import AdapterExists, AdapterNotFound
    from server.ray.catalog import SharedCatalog
    from tests.tiny import make_peft_adapter

    catalog = SharedCatalog(store, "tiny", shapes, max_rank=16)
    other = SharedCatalog(store, "tiny", shapes, max_rank=16)  # e.g. another ingress: it sees every write at once
    first = await catalog.add("x", stage(store, adapter_dir / "alpha"), overwrite=False)
    assert (await other.lookup("x")).version_id == first.version_id and first.rank == 4
    with pytest.raises(AdapterExists):
        await other.add("x", stage(store, adapter_dir / "beta"), overwrite=False)
    second = await other.add("x", stage(store, adapter_dir / "beta"), overwrite=True)
    assert (await catalog.lookup("x")).version_id == second.version_id != first.version_id
    assert await catalog.weights(second) is None  # the ingress holds no weights
    assert (await catalog.archive(second))[:2] == b"\x1f\x8b"
    wrong = make_peft_adapter(tiny_models["gpt2"], tmp_path / "gpt2", "gpt2", r=4)
    with pytest.raises(AdapterError):  # validated as an upload to the single server is, and nothing changes
        await catalog.add("y", stage(store, wrong), overwrite=False)
    assert [a.name for a in catalog.list()] == ["x"]
    await other.delete("x")
    with pytest.raises(AdapterNotFound):
        await catalog.lookup("x")
    await catalog.import_directory(adapter_dir)
    await catalog.import_directory(adapter_dir)  # the same files again: nothing new
    assert [(a.name, a.version) for a in catalog.list()] == [("alpha", 1), ("beta", 1)]
