// A validator plugin: flags TODO markers left in files.
const decoder = new TextDecoder("utf-8", { fatal: true });

export const validator = {
  validate(artifacts) {
    const found = [];
    for (const artifact of artifacts) {
      let text;
      try {
        text = decoder.decode(artifact.content);
      } catch {
        continue; // not text
      }
      text.split("\n").forEach((line, i) => {
        if (line.includes("TODO")) {
          found.push({
            severity: "warning",
            rule: "todo-marker",
            path: artifact.path,
            line: i + 1,
            column: [...line.slice(0, line.indexOf("TODO"))].length + 1,
            message: "a TODO marker is left in the file",
          });
        }
      });
    }
    return found;
  },
};
