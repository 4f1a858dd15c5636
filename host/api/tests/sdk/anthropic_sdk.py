"""The official `anthropic` Python SDK against `qlayer serve`'s Messages endpoint.

Run by host/api/tests/all/gateway.rs with QLAYER_BASE and QLAYER_KEY; the tenant's model table
is the one openai_sdk.py describes (the local OpenAI-compatible test server, a test double,
behind the openai provider plugin), so this also shows one provider serving both APIs; model
`claude` is the anthropic provider plugin in front of the Anthropic test double. Prints
one line per check; any failure raises.
"""

import os

import anthropic

base = os.environ["QLAYER_BASE"]
client = anthropic.Anthropic(base_url=base, api_key=os.environ["QLAYER_KEY"], max_retries=0)
msgs = [{"role": "user", "content": "hi"}]

m = client.messages.create(model="chat", max_tokens=64, system="be brief", messages=msgs)
assert m.type == "message" and m.role == "assistant", m
assert m.id.startswith("msg_"), m.id
assert m.model == "chat"
assert m.content[0].type == "text" and m.content[0].text == "echo: hi", m.content
assert m.stop_reason == "end_turn", m.stop_reason
assert (m.usage.input_tokens, m.usage.output_tokens) == (7, 3), m.usage
print("message: ok")

with client.messages.stream(model="chat", max_tokens=64, messages=[{"role": "user", "content": [{"type": "text", "text": "there"}]}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text == "echo: there", text
assert final.stop_reason == "end_turn", final.stop_reason
assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 2), final.usage
print("stream: ok")

try:
    with client.messages.stream(model="cut", max_tokens=64, messages=msgs) as s:
        "".join(s.text_stream)
    raise AssertionError("a cut stream ended cleanly")
except anthropic.APIError as e:
    assert "upstream" in str(e), e
print("cut stream: ok")


# Tool use: a tool_use block whole, then streamed (the SDK assembles input_json_delta pieces into
# the block's input), then the result sent back as a tool_result block.
tools = [{"name": "get_weather", "description": "The weather now",
          "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}]
ask = [{"role": "user", "content": "weather in Oslo?"}]
m = client.messages.create(model="chat", max_tokens=64, messages=ask, tools=tools, tool_choice={"type": "tool", "name": "get_weather"})
assert m.stop_reason == "tool_use", m.stop_reason
use = [b for b in m.content if b.type == "tool_use"][0]
assert use.name == "get_weather" and use.input == {"text": "weather in Oslo?"}, use
with client.messages.stream(model="chat", max_tokens=64, messages=ask, tools=tools) as s:
    final = s.get_final_message()
streamed = [b for b in final.content if b.type == "tool_use"]
assert len(streamed) == 1 and streamed[0].id == use.id and streamed[0].input == use.input, final.content
assert final.stop_reason == "tool_use"
m = client.messages.create(model="chat", max_tokens=64, tools=tools, messages=ask + [
    {"role": "assistant", "content": [b.model_dump() for b in m.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
])
assert m.content[0].text == "echo: tool said: sunny", m.content
assert m.stop_reason == "end_turn"
print("tool use: ok")

# A provider built against contract 0.1.0 serves this API too.
m = client.messages.create(model="legacy", max_tokens=9, messages=[{"role": "user", "content": "old"}])
assert m.content[0].text == "v0.1.0 echo: old [max-tokens 9]", m.content
print("contract 0.1.0: ok")

# count_tokens, which Claude Code calls to manage its context: an estimate, longer prompts more.
short = client.messages.count_tokens(model="chat", messages=msgs).input_tokens
long = client.messages.count_tokens(model="chat", system="be brief", tools=tools, messages=[{"role": "user", "content": "hi " * 400}]).input_tokens
assert 0 < short < long, (short, long)
print("count tokens: ok")


# Anthropic end to end: model `claude` is the anthropic provider plugin asking the Anthropic
# test double, so the SDK's request goes Anthropic -> contract -> Anthropic, tool use included.
m = client.messages.create(model="claude", max_tokens=64, system="be brief", messages=msgs)
assert m.content[0].text == "echo: hi" and m.stop_reason == "end_turn", m
assert (m.usage.input_tokens, m.usage.output_tokens) == (9, 3), m.usage
with client.messages.stream(model="claude", max_tokens=64, messages=ask, tools=tools) as s:
    final = s.get_final_message()
use = [b for b in final.content if b.type == "tool_use"][0]
assert use.name == "get_weather" and use.input == {"text": "weather in Oslo?"}, final.content
m = client.messages.create(model="claude", max_tokens=64, tools=tools, messages=ask + [
    {"role": "assistant", "content": [b.model_dump() for b in final.content]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rain"}]},
])
assert m.content[0].text == "echo: tool said: rain", m.content
print("anthropic plugin: ok")


def raises(cls, call, *words):
    try:
        call()
    except cls as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return e
    raise AssertionError(f"expected {cls.__name__}")


raises(anthropic.NotFoundError, lambda: client.messages.create(model="nope", max_tokens=8, messages=msgs), "nope")
raises(anthropic.NotFoundError, lambda: client.messages.count_tokens(model="nope", messages=msgs), "nope")
raises(anthropic.BadRequestError, lambda: client.messages.count_tokens(model="chat", messages=msgs, extra_body={"stream": True}), "stream")
raises(anthropic.BadRequestError, lambda: client.messages.create(
    model="legacy", max_tokens=8, messages=msgs, tools=[{"name": "f", "input_schema": {"type": "object"}}]), "tools", "echo-v0-1", "0.1.0")
raises(anthropic.BadRequestError, lambda: client.messages.create(
    model="chat", max_tokens=8, messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]), "nope")
raises(anthropic.BadRequestError, lambda: client.messages.create(model="chat", max_tokens=8, messages=[{"role": "system", "content": "x"}]), "system")
bad = anthropic.Anthropic(base_url=base, api_key="ql_" + "0" * 64, max_retries=0)
raises(anthropic.AuthenticationError, lambda: bad.messages.create(model="chat", max_tokens=8, messages=msgs))
print("errors: ok")
