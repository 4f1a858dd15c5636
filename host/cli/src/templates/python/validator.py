"""A validator plugin: flags TODO markers left in files."""
from typing import List

from wit_world import exports
from wit_world.imports import types


class Validator(exports.Validator):
    def validate(self, artifacts: List[types.Artifact]) -> List[types.Diagnostic]:
        found = []
        for artifact in artifacts:
            try:
                text = artifact.content.decode("utf-8")
            except UnicodeDecodeError:
                continue
            for number, line in enumerate(text.splitlines(), start=1):
                if "TODO" in line:
                    found.append(
                        types.Diagnostic(
                            severity=types.Severity.WARNING,
                            rule="todo-marker",
                            path=artifact.path,
                            line=number,
                            message="a TODO marker is left in the file",
                        )
                    )
        return found
