// An agent plugin: asks the model (through the host) to summarise the requirement.
import { complete } from "quantumlayer:plugin/llm@0.2.0";

const message = (role, text) => ({ role, content: [{ tag: "text", val: text }], toolCalls: [] });

export const agent = {
  role() {
    return "summariser";
  },
  run(task) {
    const reply = complete({
      model: "", // empty: the model the host routes this step to
      messages: [
        message("system", "Role: summariser.\nSummarise the requirement in one paragraph."),
        message("user", task.requirement),
      ],
      tools: [],
      responseFormat: { tag: "text" },
      maxTokens: 400,
      stop: [],
    });
    return {
      artifacts: [{ path: "SUMMARY.md", mediaType: "text/markdown", content: new TextEncoder().encode(reply.text) }],
      summary: "summary written",
    };
  },
};
