"""The official `anthropic` Python SDK against `qlayer serve`'s Messages endpoint.

Run by host/api/tests/all/gateway.rs with QLAYER_BASE and QLAYER_KEY; the tenant's model table
is the one openai_sdk.py describes (the local OpenAI-compatible test server, a test double,
behind the openai provider plugin), so this also shows one provider serving both APIs. Prints
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


def raises(cls, call, *words):
    try:
        call()
    except cls as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return e
    raise AssertionError(f"expected {cls.__name__}")


raises(anthropic.NotFoundError, lambda: client.messages.create(model="nope", max_tokens=8, messages=msgs), "nope")
raises(anthropic.BadRequestError, lambda: client.messages.create(
    model="chat", max_tokens=8, messages=msgs, tools=[{"name": "f", "input_schema": {"type": "object"}}]), "tools", "0.1.0")
raises(anthropic.BadRequestError, lambda: client.messages.create(model="chat", max_tokens=8, messages=[{"role": "system", "content": "x"}]), "system")
bad = anthropic.Anthropic(base_url=base, api_key="ql_" + "0" * 64, max_retries=0)
raises(anthropic.AuthenticationError, lambda: bad.messages.create(model="chat", max_tokens=8, messages=msgs))
print("errors: ok")
