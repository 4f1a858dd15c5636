"""A tool plugin: JSON in, JSON out."""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types


class Tool(exports.Tool):
    def invoke(self, input_json: str) -> str:
        try:
            value = json.loads(input_json)
        except ValueError as e:
            # An error of the contract's `plugin-error` variant: the caller sees `invalid-input`.
            raise Err(types.PluginError_InvalidInput(f"input is not JSON: {e}"))
        host.log(types.LogLevel.DEBUG, "echoing the input")
        return json.dumps({"echo": value})
