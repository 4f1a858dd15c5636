// A tool plugin: JSON in, JSON out.
import { log } from "quantumlayer:plugin/host@0.2.0";

export const tool = {
  invoke(inputJson) {
    let value;
    try {
      value = JSON.parse(inputJson);
    } catch (e) {
      // An error of the contract's `plugin-error` variant: the caller sees `invalid-input`.
      throw { tag: "invalid-input", val: `input is not JSON: ${e.message}` };
    }
    log("debug", "echoing the input");
    return JSON.stringify({ echo: value });
  },
};
