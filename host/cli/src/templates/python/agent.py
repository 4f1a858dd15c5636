"""An agent plugin: asks the model (through the host) to summarise the requirement."""
from wit_world import exports
from wit_world.imports import llm
from wit_world.imports import quantumlayer_plugin_types_0_2_0 as types
from wit_world.imports import quantumlayer_plugin_types_0_3_0 as types3  # 0.3.0's task and diagnostic


def message(role: types.Role, text: str) -> types.Message:
    return types.Message(
        role=role, content=[types.ContentPart_Text(text)], tool_calls=[], tool_call_id=None, name=None
    )


class Agent(exports.Agent):
    def role(self) -> str:
        return "summariser"

    def run(self, task: types3.Task) -> types.AgentOutput:
        request = types.CompletionRequest(
            model="",  # empty: the model the host routes this step to
            messages=[
                message(types.Role.SYSTEM, "Role: summariser.\nSummarise the requirement in one paragraph."),
                message(types.Role.USER, task.requirement),
            ],
            tools=[],
            tool_choice=None,
            parallel_tool_calls=None,
            response_format=types.ResponseFormat_Text(),
            max_tokens=400,
            temperature=None,
            top_p=None,
            top_k=None,
            seed=None,
            stop=[],
            user=None,
        )
        reply = llm.complete(request)
        summary = types.Artifact(path="SUMMARY.md", media_type="text/markdown", content=reply.text.encode("utf-8"))
        return types.AgentOutput(artifacts=[summary], summary="summary written")
