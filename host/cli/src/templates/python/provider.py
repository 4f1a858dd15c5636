"""A provider plugin: echoes the last message back (replace with calls to your API)."""
from typing import List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import provider
from wit_world.imports import types


def reply(request: types.CompletionRequest) -> str:
    if not request.messages:
        raise Err(types.PluginError_InvalidInput("no messages"))
    return "".join(p.value for p in request.messages[-1].content if isinstance(p, types.ContentPart_Text))


class CompletionStream(provider.CompletionStream):
    def __init__(self, text: str):
        self.text: Optional[str] = text

    def next(self) -> Optional[types.CompletionChunk]:
        text, self.text = self.text, None
        if text is None:
            return None
        return types.CompletionChunk(delta=text, tool_calls=[], finish_reason=types.FinishReason_Stop(), usage=None)


class Provider(exports.Provider):
    def models(self) -> List[types.ModelInfo]:
        return [types.ModelInfo(id="echo", owned_by="me")]

    def complete(self, request: types.CompletionRequest) -> types.Completion:
        return types.Completion(
            model="echo",
            text=reply(request),
            tool_calls=[],
            finish_reason=types.FinishReason_Stop(),
            usage=types.Usage(prompt_tokens=0, completion_tokens=0),
        )

    def stream(self, request: types.CompletionRequest) -> provider.CompletionStream:
        return CompletionStream(reply(request))

    def embed(self, request: types.EmbeddingRequest) -> types.Embeddings:
        raise Err(types.PluginError_InvalidInput("this provider has no embeddings"))
