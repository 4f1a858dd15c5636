"""The official `openai` Python SDK against `qlayer serve`'s gateway.

Run by host/api/tests/all/gateway.rs with QLAYER_BASE (the service's base URL), QLAYER_KEY (a
tenant's key) and QLAYER_OTHER_KEY (another tenant's). The tenant's model table has `chat`
(deployment: the openai plugin asking the local OpenAI-compatible test server, a test double,
for model `ok`), `cut` (its upstream cuts streams short), `embed`, and `legacy` (a provider
component built against contract 0.1.0, which has no tools). With tools, the test server calls the
named (else the first) tool with `{"text": <last user text>}` and answers a tool result with
`tool said: <result>`; with a JSON schema it answers an object of the schema's property types.
Prints one line per check; any failure raises, which exits non-zero with the traceback.
"""

import base64
import json
import os
import struct

import openai
import pydantic

base = os.environ["QLAYER_BASE"] + "/v1"
client = openai.OpenAI(base_url=base, api_key=os.environ["QLAYER_KEY"], max_retries=0)

# Models: the tenant's names, as OpenAI lists them.
names = sorted(m.id for m in client.models.list())
assert names == ["chat", "cut", "embed", "legacy"], names
assert client.models.retrieve("chat").owned_by == "acme"
print("models: ok")

# A whole completion, field for field.
c = client.chat.completions.create(
    model="chat",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    max_tokens=16,
    temperature=0,
    stop=["\n\n"],
    user="u-1",
    metadata={"run": "sdk"},
)
assert c.object == "chat.completion", c
assert c.id.startswith("chatcmpl-"), c.id
assert c.model == "chat", c.model
assert c.choices[0].message.role == "assistant"
assert c.choices[0].message.content == "echo: hi", c.choices[0].message
assert c.choices[0].finish_reason == "stop"
assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (7, 3, 10), c.usage
raw = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
assert float(raw.headers["x-qlayer-overhead-ms"]) >= 0, raw.headers
print("completion: ok")

# A stream with usage: role first, the text in order, a finish reason, the usage chunk last.
stream = client.chat.completions.create(
    model="chat",
    messages=[{"role": "user", "content": "there"}],
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert text == "echo: there", text
assert chunks[0].choices[0].delta.role == "assistant"
finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
assert finishes == ["stop"], finishes
assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7, chunks[-1]
assert len({ch.id for ch in chunks}) == 1
print("stream: ok")

# A stream the upstream cuts: the SDK raises, it does not end as if complete.
try:
    for _ in client.chat.completions.create(model="cut", messages=[{"role": "user", "content": "x"}], stream=True):
        pass
    raise AssertionError("a cut stream ended cleanly")
except openai.APIError as e:
    assert "stream" in str(e) or "upstream" in str(e), e
print("cut stream: ok")

# Tools: a tool call whole, then streamed (the SDK's chunks reassembled by index), then the
# tool's result sent back as a `tool` message.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
}]
ask = [{"role": "user", "content": "weather in Oslo?"}]
c = client.chat.completions.create(model="chat", messages=ask, tools=tools, tool_choice="required", seed=7, top_p=0.9)
assert c.choices[0].finish_reason == "tool_calls", c.choices[0]
call = c.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"text": "weather in Oslo?"}, call.function.arguments
assert c.choices[0].message.content is None
calls = {}
finish = None
for ch in client.chat.completions.create(model="chat", messages=ask, tools=tools, stream=True):
    if not ch.choices:
        continue
    for d in ch.choices[0].delta.tool_calls or []:
        entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
        if d.id:
            entry["id"] = d.id
        if d.function and d.function.name:
            entry["name"] = d.function.name
        if d.function and d.function.arguments:
            entry["arguments"] += d.function.arguments
            entry["pieces"] += 1
    finish = ch.choices[0].finish_reason or finish
assert list(calls) == [0], calls
assert calls[0]["id"] == call.id and calls[0]["name"] == "get_weather", calls
assert calls[0]["pieces"] >= 2 and json.loads(calls[0]["arguments"]) == {"text": "weather in Oslo?"}, calls
assert finish == "tool_calls", finish
c = client.chat.completions.create(
    model="chat",
    tools=tools,
    messages=ask + [c.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
)
assert c.choices[0].message.content == "echo: tool said: sunny", c.choices[0].message
assert c.choices[0].finish_reason == "stop"
print("tools: ok")


# Structured output: the SDK's own parse() with a pydantic model, which sends a strict JSON schema.
class City(pydantic.BaseModel):
    name: str
    population: int


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
p = parse(model="chat", messages=[{"role": "user", "content": "a city"}], response_format=City)
city = p.choices[0].message.parsed
assert isinstance(city, City) and city.population == 1 and city.name == "echo: a city", p.choices[0].message
print("structured output: ok")

# A provider built against contract 0.1.0 still serves, whole and streamed.
c = client.chat.completions.create(model="legacy", messages=[{"role": "user", "content": "old"}], max_tokens=9)
assert c.choices[0].message.content == "v0.1.0 echo: old [max-tokens 9]", c.choices[0].message
text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
    model="legacy", messages=[{"role": "user", "content": "old"}], stream=True) if ch.choices)
assert text == "v0.1.0 echo: old", text
print("contract 0.1.0: ok")

# Embeddings: the SDK asks for base64 and decodes it; floats when asked.
e = client.embeddings.create(model="embed", input=["a", "b"])
assert [d.index for d in e.data] == [0, 1]
assert e.data[1].embedding == [1.0, 0.5, -0.5], e.data[1].embedding
assert e.usage.prompt_tokens == 3
f = client.embeddings.with_raw_response.create(model="embed", input="a", encoding_format="float")
assert f.http_response.json()["data"][0]["embedding"] == [0.0, 0.5, -0.5]
print("embeddings: ok")

# Errors, as the SDK's own exception classes, with the message naming what is wrong.
def raises(cls, call, *words):
    try:
        call()
    except cls as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return e
    raise AssertionError(f"expected {cls.__name__}")

msgs = [{"role": "user", "content": "x"}]
e = raises(openai.NotFoundError, lambda: client.chat.completions.create(model="nope", messages=msgs), "nope")
assert e.code == "model_not_found", e.code
e = raises(openai.BadRequestError, lambda: client.chat.completions.create(model="chat", messages=msgs, extra_body={"temprature": 1}), "temprature")
assert e.param == "temprature", e.param
raises(openai.BadRequestError, lambda: client.chat.completions.create(model="chat", messages=msgs, n=2), "n")
e = raises(openai.BadRequestError, lambda: client.chat.completions.create(
    model="legacy", messages=msgs, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    "tools", "echo-v0-1", "0.1.0")
assert e.param == "tools" and e.code == "unsupported_feature", (e.param, e.code)
raises(openai.BadRequestError, lambda: client.chat.completions.create(model="chat", messages=[{"role": "tool", "content": "x", "tool_call_id": "c"}]), "tool_call_id")
e = raises(openai.BadRequestError, lambda: client.chat.completions.create(
    model="chat", messages=msgs, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), "nope")
assert e.param == "tool_choice.function.name", e.param
bad = openai.OpenAI(base_url=base, api_key="ql_" + "0" * 64, max_retries=0)
raises(openai.AuthenticationError, lambda: bad.chat.completions.create(model="chat", messages=msgs))
other = openai.OpenAI(base_url=base, api_key=os.environ["QLAYER_OTHER_KEY"], max_retries=0)
raises(openai.NotFoundError, lambda: other.chat.completions.create(model="chat", messages=msgs), "chat")
raises(openai.NotFoundError, lambda: other.models.retrieve("chat"))
assert [m.id for m in other.models.list()] == []
print("errors: ok")
