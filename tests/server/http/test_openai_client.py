"""The official `openai` package against the live server: the API is OpenAI-compatible as clients see it."""

from __future__ import annotations

import openai
import pytest

BASE = "llama"  # the tiny model directory's name is the base model id
MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture
def client(live_server):
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def test_models_list(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {BASE, "alpha", "beta"}
    assert models["alpha"].owned_by and models["alpha"].model_extra["parent"] == BASE


def test_completions_create(client):
    r = client.completions.create(
        model="alpha", prompt="LoRA adapters are", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == "alpha"
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_completions_stream(client):
    kwargs = {"model": "alpha", "prompt": "LoRA adapters are", "max_tokens": 8, "temperature": 0}
    full = client.completions.create(**kwargs)
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(**kwargs, stream=True))
    assert text == full.choices[0].text


def test_chat_completions_create(client):
    r = client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_completion_tokens=4, temperature=0, seed=1, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


def test_chat_stream(client):
    kwargs = {
        "model": "beta",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)


def test_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="hi", max_tokens=500)
