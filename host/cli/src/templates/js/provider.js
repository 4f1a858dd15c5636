// A provider plugin: echoes the last message back (replace with calls to your API with fetch,
// to the hosts its install grants).
function reply(request) {
  const last = request.messages[request.messages.length - 1];
  if (!last) {
    throw { tag: "invalid-input", val: "no messages" };
  }
  return last.content.filter((part) => part.tag === "text").map((part) => part.val).join("");
}

class CompletionStream {
  constructor(text) {
    this.text = text;
  }
  next() {
    if (this.text === undefined) {
      return undefined; // the end of the stream
    }
    const delta = this.text;
    this.text = undefined;
    return { delta, toolCalls: [], finishReason: { tag: "stop" } };
  }
}

export const provider = {
  CompletionStream,
  models() {
    return [{ id: "echo", ownedBy: "me" }];
  },
  complete(request) {
    return {
      model: "echo",
      text: reply(request),
      toolCalls: [],
      finishReason: { tag: "stop" },
      usage: { promptTokens: 0, completionTokens: 0 },
    };
  },
  stream(request) {
    return new CompletionStream(reply(request));
  },
  embed() {
    throw { tag: "invalid-input", val: "this provider has no embeddings" };
  },
};
