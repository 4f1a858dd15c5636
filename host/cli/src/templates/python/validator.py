"""A validator plugin: flags TODO markers left in files."""
from typing import List

from wit_world import exports
from wit_world.imports import quantumlayer_plugin_types_0_2_0 as types
from wit_world.imports import quantumlayer_plugin_types_0_3_0 as types3  # 0.3.0's diagnostic, with a column


class Validator(exports.Validator):
    def validate(self, artifacts: List[types.Artifact]) -> List[types3.Diagnostic]:
        found = []
        for artifact in artifacts:
            try:
                text = artifact.content.decode("utf-8")
            except UnicodeDecodeError:
                continue
            for number, line in enumerate(text.splitlines(), start=1):
                if "TODO" in line:
                    found.append(
                        types3.Diagnostic(
                            severity=types.Severity.WARNING,
                            rule="todo-marker",
                            path=artifact.path,
                            line=number,
                            column=line.index("TODO") + 1,
                            message="a TODO marker is left in the file",
                        )
                    )
        return found
