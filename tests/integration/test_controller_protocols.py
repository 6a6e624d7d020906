"""The controller's compatibility surfaces with real clients: the official `openai` client,
CloudEvents (binary and structured) and Knative Host routing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

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


def test_openai_without_max_tokens_a_long_prompt_gets_the_rest_of_the_context(
    stack: dict[str, Any],
) -> None:
    """The function allows 512 tokens, more than the model's context (128): a request that
    names no max_tokens generates what the context leaves instead of failing."""
    make_fn(api(stack), "roomy")
    client = oai(stack)
    prompt = [5] * 100
    done = client.completions.create(model="roomy", prompt=prompt, temperature=0)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (100, 28)
    assert done.choices[0].finish_reason == "length"  # greedy on [5] * n meets no eos
    chat = client.chat.completions.create(
        model="roomy", messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True
    )
    assert [c.choices[0].finish_reason for c in chat if c.choices][-1] in ("length", "stop")
    # max_completion_tokens wins over max_tokens.
    both = client.completions.create(
        model="roomy",
        prompt=prompt,
        temperature=0,
        max_tokens=1,
        extra_body={"max_completion_tokens": 28},
    )
    assert both.usage.completion_tokens == 28


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_openai_context_overflow_is_a_400_naming_the_field(
    stack: dict[str, Any], stream: bool
) -> None:
    """Found before the first byte, so a streaming client gets a real 400 too."""
    name = "tight-stream" if stream else "tight-blocking"
    make_fn(api(stack), name)
    client = oai(stack)
    messages = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": [5] * 100, "max_tokens": 29}, "max_tokens"),
        (
            {"prompt": [5] * 100, "extra_body": {"max_completion_tokens": 29}},
            "max_completion_tokens",
        ),
        ({"prompt": [5] * 128}, "prompt"),
        ({"prompt": "hi " * 200}, "prompt"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=name, stream=stream, **fields)
        assert bad.value.code == "context_length_exceeded", fields
        assert bad.value.param == param
        assert "maximum context length is 128 tokens" in bad.value.message
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=name, messages=messages * 60, stream=stream)
    assert (chat.value.code, chat.value.param) == ("context_length_exceeded", "messages")
    native = httpx.post(
        stack["ctl"].url + f"/api/v1/namespaces/_/functions/{name}/invocations",
        params={"stream": "true"} if stream else {"blocking": "true"},
        json={"tokens": [5] * 100, "max_tokens": 29},
        headers=_ce_headers(stack),
        timeout=120,
    )
    assert native.status_code == 400
    error = native.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert native.json()["activationId"]  # stored, as a failed blocking call is


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


def test_openai_embeddings_of_token_ids_and_too_long_inputs(stack: dict[str, Any]) -> None:
    """Token ids (LangChain's default) embed like their text; too long is a 400, not a cut."""
    make_fn(api(stack), "emb-ids", model="emb", task="embed")
    client = oai(stack)
    ids = AutoTokenizer.from_pretrained(stack["root"] / "hf-emb")("a cat")["input_ids"]
    by_text = client.embeddings.create(model="emb-ids", input="a cat", encoding_format="float")
    one = client.embeddings.create(model="emb-ids", input=ids, encoding_format="float")
    lists = client.embeddings.create(model="emb-ids", input=[ids, [4]])
    assert one.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    assert one.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-5)
    assert len(lists.data) == 2 and lists.usage.prompt_tokens == len(ids) + 1
    assert lists.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-5)
    for long in ("a cat " * 300, [[1] * 129]):
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model="emb-ids", input=long)
        assert (bad.value.code, bad.value.param) == ("context_length_exceeded", "input")


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
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/cloudevents+json"
    assert missing.json()["type"] == "dev.sllm.function.error"
    assert "source" in missing.json()["data"]["error"]["message"]


def test_cloudevents_errors_before_dispatch_are_cloudevents(stack: dict[str, Any]) -> None:
    """Unknown function, bad parameters, a bad key: the caller sent a CloudEvent, so the
    error comes back as one (in its mode), as errors after dispatch do."""
    make_fn(api(stack), "ce-strict")
    binary = {
        "ce-specversion": "1.0",
        "ce-id": "evt-9",
        "ce-source": "/tests",
        "ce-type": "dev.example.prompt",
        "content-type": "application/json",
    }
    data = json.dumps({"prompt": "hi", "max_tokens": 1})
    base = stack["ctl"].url + "/t/alpha/"
    unknown = httpx.post(
        base + "no-such-fn", content=data, headers={**_ce_headers(stack), **binary}
    )
    assert unknown.status_code == 404
    assert unknown.headers["ce-type"] == "dev.sllm.function.error"
    assert unknown.headers["ce-subject"] == "evt-9"
    assert unknown.headers["ce-source"] == "/sllm/alpha/no-such-fn"
    assert unknown.json()["error"]["code"] == "not_found"

    bad_key = httpx.post(
        base + "ce-strict",
        content=data,
        headers={**binary, "Authorization": "Bearer nobody:nothing"},
    )
    assert bad_key.status_code == 401
    assert bad_key.headers["ce-type"] == "dev.sllm.function.error"
    assert bad_key.json()["error"]["code"] == "unauthorized"

    event = {
        "specversion": "1.0",
        "id": "evt-10",
        "source": "/tests",
        "type": "dev.example.prompt",
        "data": {"prompt": "hi", "no_such_param": 1},
    }
    bad_params = httpx.post(
        base + "ce-strict",
        content=json.dumps(event),
        headers={**_ce_headers(stack), "content-type": "application/cloudevents+json"},
    )
    assert bad_params.status_code == 400
    reply = bad_params.json()
    assert reply["type"] == "dev.sllm.function.error" and reply["subject"] == "evt-10"
    assert "no_such_param" in reply["data"]["error"]["message"]

    # A plain JSON caller still gets plain JSON.
    plain = httpx.post(base + "no-such-fn", json={"prompt": "hi"}, headers=_ce_headers(stack))
    assert plain.status_code == 404 and "ce-type" not in plain.headers
    assert plain.json()["error"]["code"] == "not_found"


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


def test_openai_n_logprobs_and_json_schema(stack: dict[str, Any]) -> None:
    """What vLLM users reach for, through the official client: n, logprobs, json_schema."""
    make_fn(api(stack), "feature-fn")
    client = oai(stack)
    messages = [{"role": "user", "content": "Tell me a story."}]

    many = client.chat.completions.create(
        model="feature-fn", messages=messages, max_tokens=8, temperature=1.0, seed=5, n=3
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1  # seed + i per choice
    if all(c.finish_reason == "length" for c in many.choices):
        assert many.usage.completion_tokens == 3 * 8  # usage counts every choice
    streamed = client.chat.completions.create(
        model="feature-fn",
        messages=messages,
        max_tokens=8,
        temperature=1.0,
        seed=5,
        n=3,
        stream=True,
    )
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in many.choices]

    scored = client.chat.completions.create(
        model="feature-fn",
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = scored.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob >= entry.top_logprobs[-1].logprob - 1e-6  # greedy: the best one
    completion = client.completions.create(
        model="feature-fn", prompt="Once upon", max_tokens=4, temperature=0, logprobs=2
    )
    assert len(completion.choices[0].logprobs.token_logprobs) >= 1

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model="feature-fn",
        messages=messages,
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    doc = json.loads(shaped.choices[0].message.content)
    assert set(doc) == {"name", "age"} and isinstance(doc["age"], int)

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="feature-fn",
            messages=messages,
            max_tokens=5,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}},
            },
        )
    assert info.value.body["param"] == "response_format"
