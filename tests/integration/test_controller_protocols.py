"""The controller's compatibility surfaces with real clients: the official `openai` client,
CloudEvents (binary and structured) and Knative Host routing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support.controller import api, make_fn

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.invoker]


def oai(stack: dict[str, Any], ns: str = "alpha") -> Any:
    return openai.OpenAI(
        base_url=stack["ctl"].url + "/v1", api_key=stack["keys"][ns], max_retries=0, timeout=120
    )


def test_openai_models_and_chat(stack: dict[str, Any]) -> None:
    make_fn(api(stack), "chat-fn")
    client = oai(stack)
    ids = [m.id for m in client.models.list().data]
    assert "chat-fn" in ids
    assert client.models.retrieve("chat-fn").owned_by == "alpha"
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(
        model="chat-fn", messages=messages, max_tokens=6, temperature=0
    )
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 6 or reply.choices[0].finish_reason == "stop"
    text = reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="chat-fn",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_openai_completions_and_errors(stack: dict[str, Any]) -> None:
    make_fn(api(stack), "text-fn")
    client = oai(stack)
    done = client.completions.create(
        model="text-fn", prompt="Once upon", max_tokens=4, temperature=0
    )
    assert done.object == "text_completion" and done.usage.prompt_tokens > 0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="text-fn", prompt="Once upon", max_tokens=4, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == done.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-fn", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="text-fn", prompt="x", max_tokens=1, temperature=9)
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=stack["ctl"].url + "/v1", api_key="nobody:nothing", max_retries=0
        ).models.list()
    # Another namespace's function is invisible through the OpenAI surface.
    with pytest.raises(openai.NotFoundError):
        oai(stack, "beta").completions.create(model="text-fn", prompt="x", max_tokens=1)


def test_openai_embeddings(stack: dict[str, Any]) -> None:
    make_fn(api(stack), "emb-fn", model="emb", task="embed")
    client = oai(stack)
    got = client.embeddings.create(model="emb-fn", input=["a cat", "a dog"])  # base64 on the wire
    floats = client.embeddings.create(
        model="emb-fn", input=["a cat", "a dog"], encoding_format="float"
    )
    assert len(got.data) == 2 and got.usage.prompt_tokens > 0
    for a, b in zip(got.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="emb-fn", messages=[{"role": "user", "content": "x"}])


def _ce_headers(stack: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack['keys']['alpha']}"}


def test_cloudevents_binary_and_structured(stack: dict[str, Any]) -> None:
    make_fn(api(stack), "ce-fn")
    url = stack["ctl"].url + "/t/alpha/ce-fn"
    data = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    binary = httpx.post(
        url,
        content=json.dumps(data),
        headers={
            **_ce_headers(stack),
            "ce-specversion": "1.0",
            "ce-id": "evt-1",
            "ce-source": "/tests",
            "ce-type": "dev.example.prompt",
            "content-type": "application/json",
        },
        timeout=120,
    )
    assert binary.status_code == 200, binary.text
    assert binary.headers["ce-type"] == "dev.sllm.function.response"
    assert binary.headers["ce-subject"] == "evt-1"
    assert binary.headers["ce-source"] == "/sllm/alpha/ce-fn"
    assert binary.json()["usage"]["completion_tokens"] >= 1
    event = {
        "specversion": "1.0",
        "id": "evt-2",
        "source": "/tests",
        "type": "dev.example.prompt",
        "datacontenttype": "application/json",
        "data": data,
    }
    structured = httpx.post(
        url,
        content=json.dumps(event),
        headers={**_ce_headers(stack), "content-type": "application/cloudevents+json"},
        timeout=120,
    )
    assert structured.status_code == 200, structured.text
    reply = structured.json()
    assert reply["type"] == "dev.sllm.function.response" and reply["subject"] == "evt-2"
    assert reply["data"]["text"] == binary.json()["text"]  # greedy: same output
    missing = httpx.post(
        url,
        content=json.dumps({k: v for k, v in event.items() if k != "source"}),
        headers={**_ce_headers(stack), "content-type": "application/cloudevents+json"},
    )
    assert missing.status_code == 400 and "source" in missing.json()["error"]["message"]


def test_knative_host_routing(stack: dict[str, Any]) -> None:
    make_fn(api(stack), "routed")
    url = stack["ctl"].url + "/"
    body = {"prompt": "hi", "max_tokens": 2}
    ok = httpx.post(
        url,
        json=body,
        headers={**_ce_headers(stack), "Host": "routed.alpha.sllm.local"},
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1
    wrong = httpx.post(
        url, json=body, headers={**_ce_headers(stack), "Host": "routed.alpha.example.com"}
    )
    assert wrong.status_code == 400
    other = httpx.post(
        url,
        json=body,
        headers={
            "Authorization": f"Bearer {stack['keys']['beta']}",
            "Host": "routed.alpha.sllm.local",
        },
    )
    assert other.status_code == 403
