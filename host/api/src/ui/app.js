// The dashboard's one script: a run's page follows the run over server-sent events. Without it
// every page still shows everything as of its rendering.
(function () {
  "use strict";
  // Parts of a page that only a script makes true (the live note) show only with it.
  document.documentElement.classList.add("js");
  var table = document.querySelector("table[data-events]");
  if (!table || !window.EventSource) return;
  var body = table.tBodies[0];
  var fields = ["name", "kind", "status", "attempts", "after", "tokens", "cost", "summary"];

  function row(name) {
    var rows = body.rows;
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-task") === name) return rows[i];
    }
    var tr = document.createElement("tr");
    tr.setAttribute("data-task", name);
    fields.forEach(function (f) {
      var cell = document.createElement(f === "name" ? "th" : "td");
      if (f === "name") { cell.setAttribute("scope", "row"); cell.textContent = name; }
      cell.setAttribute("data-field", f);
      tr.appendChild(cell);
    });
    body.appendChild(tr);
    return tr;
  }

  function set(tr, field, text) {
    var cell = tr.querySelector('[data-field="' + field + '"]');
    if (!cell || text === undefined || text === null) return;
    if (field === "status") {
      cell.textContent = "";
      var badge = document.createElement("span");
      badge.className = "badge " + text;
      badge.textContent = text;
      cell.appendChild(badge);
    } else {
      cell.textContent = String(text);
    }
  }

  function text(id, value) {
    var el = document.getElementById(id);
    if (el && value !== undefined && value !== null) el.textContent = String(value);
  }

  window.qlayerEvents = [];
  var source = new EventSource(table.getAttribute("data-events"));
  var ends = { waiting: 1, succeeded: 1, failed: 1, cancelled: 1 };

  function handle(kind, e) {
    var d;
    try { d = JSON.parse(e.data); } catch (err) { return; }
    var seen = Date.now();
    // What the page received and when it showed it (for measuring the delay to the screen).
    window.qlayerEvents.push({ seq: d.seq, kind: kind, at: d.at, seen: seen });
    if (d.task) {
      var tr = row(d.task);
      set(tr, "status", d.status || (kind === "started" ? "leased" : d.state));
      set(tr, "attempts", d.attempts);
      set(tr, "kind", d.kind_of_task);
      set(tr, "after", d.after);
      set(tr, "tokens", d.tokens);
      set(tr, "cost", d.cost);
      set(tr, "summary", d.summary);
      tr.setAttribute("data-event-at", d.at);
      tr.setAttribute("data-seen-at", seen);
      tr.setAttribute("data-seq", d.seq);
    }
    text("run-tokens", d.run_tokens);
    text("run-cost", d.run_cost);
    var status = document.getElementById("run-status");
    if (status) {
      status.setAttribute("data-event-at", d.at);
      status.setAttribute("data-seen-at", seen);
      status.setAttribute("data-last-event", kind);
    }
    var note = document.getElementById("live-note");
    if (note) note.textContent = "Last event: " + kind + (d.task ? " " + d.task : "") + ".";
    if (kind === "approved" || kind === "rejected") {
      // Decided (here or elsewhere): the gate's forms are over.
      var gate = document.getElementById("gate");
      if (gate) {
        gate.textContent = "";
        var said = document.createElement("p");
        said.textContent = "The gate was " + kind + (d.by ? " by " + d.by : "") + (d.comment ? ": " + d.comment : ".");
        gate.appendChild(said);
      }
    }
    if (ends[kind]) {
      // A gate or the end. The page is not reloaded under the reader (WCAG "change on request"):
      // the status changes, and a link says what reloading shows.
      source.close();
      if (status) {
        status.textContent = "";
        var badge = document.createElement("span");
        badge.className = "badge " + kind;
        badge.textContent = kind;
        status.appendChild(badge);
        status.setAttribute("data-status", kind);
      }
      if (note) {
        note.textContent = "";
        var link = document.createElement("a");
        link.id = "refresh";
        link.href = window.location.pathname;
        link.textContent = kind === "waiting"
          ? "The run waits at gate " + (d.gate || "") + ": show the decision"
          : "The run ended (" + kind + "): show its report";
        note.appendChild(link);
      }
    }
  }

  ["queued", "started", "progress", "retrying", "waiting", "approved", "rejected", "succeeded", "failed", "cancelled"]
    .forEach(function (kind) {
      source.addEventListener(kind, function (e) { handle(kind, e); });
    });
})();
