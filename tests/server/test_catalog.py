"""The adapter catalog: validate → store → register → retire, the one path of uploads, the adapter folder and
trained adapters."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoModelForCausalLM

from adapters.peft_io import AdapterError
from adapters.targets import adaptable_layers, layer_shape
from adapters.tiers.registry import AdapterExists, AdapterNotFound, AdapterRegistry
from adapters.tiers.store import AdapterStore
from server.catalog import AdapterCatalog


@pytest.fixture(scope="module")
def shapes(llama_dir) -> dict[str, tuple[int, int]]:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return {name: layer_shape(layer) for name, layer in adaptable_layers(model).items()}


@pytest.fixture
def catalog(tmp_path, shapes):
    retired = []
    cat = AdapterCatalog(AdapterStore(tmp_path / "store"), AdapterRegistry(), "tiny", shapes, max_rank=16,
                         on_retire=lambda: retired.append(1))  # fmt: skip
    cat.retired = retired
    return cat


def copy_to_scratch(catalog: AdapterCatalog, src) -> object:
    scratch = catalog.scratch_dir() / "adapter"
    shutil.copytree(src, scratch)
    return scratch


@pytest.mark.asyncio
async def test_add_overwrite_delete(catalog, adapter_dir, tmp_path):
    first = await catalog.add("x", copy_to_scratch(catalog, adapter_dir / "alpha"), overwrite=False)
    assert catalog.get("x") is first and first.version == 1 and first.rank == 4 and first.path.is_dir()
    with pytest.raises(AdapterExists):
        await catalog.add("x", copy_to_scratch(catalog, adapter_dir / "beta"), overwrite=False)
    second = await catalog.add("x", copy_to_scratch(catalog, adapter_dir / "beta"), overwrite=True)
    assert first.retired and second.version == 2 and second.rank == 8 and not first.path.exists()
    assert (await catalog.weights(second)).rank == 8
    assert (await catalog.archive(second))[:2] == b"\x1f\x8b"  # gzip
    await catalog.delete("x")
    assert not catalog.exists("x") and second.retired and len(catalog.retired) == 3
    with pytest.raises(AdapterNotFound):
        await catalog.delete("x")


@pytest.mark.asyncio
async def test_every_problem_in_one_error_and_nothing_changes(catalog, adapter_dir, tiny_models, tmp_path):
    from tests.tiny import make_peft_adapter

    wrong_base = make_peft_adapter(tiny_models["gpt2"], tmp_path / "gpt2", "gpt2", r=4)
    with pytest.raises(AdapterError) as e:
        await catalog.add("../bad", copy_to_scratch(catalog, wrong_base), overwrite=False, problems=["pickle refused"])
    problems = e.value.problems
    assert problems[0].startswith("invalid adapter name") and problems[1] == "pickle refused"
    assert any("not an adaptable linear layer" in p for p in problems)
    assert catalog.list() == [] and catalog.retired == []
    big = make_peft_adapter(tiny_models["llama"], tmp_path / "big", "llama", r=32)
    with pytest.raises(AdapterError, match="over the limit of 16"):
        await catalog.add("big", copy_to_scratch(catalog, big), overwrite=False)


@pytest.mark.asyncio
async def test_a_copied_adapter_stays_where_it_was(catalog, adapter_dir):
    await catalog.add_copy("trained", adapter_dir / "alpha", overwrite=False)
    assert (adapter_dir / "alpha" / "adapter_model.safetensors").exists() and catalog.exists("trained")


@pytest.mark.asyncio
async def test_start_up_registers_the_store_and_a_folder(tmp_path, shapes, adapter_dir):
    store = AdapterStore(tmp_path / "store")
    first = AdapterCatalog(store, AdapterRegistry(), "tiny", shapes, 16, on_retire=lambda: None)
    scratch = store.scratch_dir() / "adapter"
    shutil.copytree(adapter_dir / "beta", scratch)
    await first.add("uploaded", scratch, overwrite=False)
    folder = tmp_path / "folder"
    shutil.copytree(adapter_dir, folder)
    (folder / "bad name!").mkdir()
    (folder / "bad name!" / "adapter_config.json").write_text("{}")
    (folder / "uploaded").mkdir()  # the same name as a stored adapter: skipped, the stored one stays
    shutil.copy(adapter_dir / "alpha" / "adapter_config.json", folder / "uploaded")
    again = AdapterCatalog(AdapterStore(tmp_path / "store"), AdapterRegistry(), "tiny", shapes, 16, lambda: None)
    again.register_stored()
    again.register_directory(folder)
    assert [a.name for a in again.list()] == ["alpha", "beta", "uploaded"]
    stored = again.get("uploaded")
    assert stored.weights is None and stored.rank == 8 and stored.version == 1  # weights read on first use
