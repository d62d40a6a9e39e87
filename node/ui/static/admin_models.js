// Models admin page: activate a registry entry or roll back, through the activation guard.
const message = $("#model-message");
const guard = $("#guard");
let pending = null; // what the guard refused: {path, json}

async function request(path, json) {
  message.textContent = "Working…";
  guard.hidden = true;
  try {
    const done = await api(path, { method: "POST", json });
    message.textContent = `Active: ${done.active} (was ${done.previous || "none"})` +
      (done.forced ? "; the guard's objections were overridden (recorded)" : "") + ". Reloading…";
    window.location.reload();
  } catch (err) {
    if (err.status === 409 && err.body && err.body.reasons) {
      pending = { path, json: { ...json, force: true } };
      $("#guard-reasons").replaceChildren(...err.body.reasons.map((r) => text("li", r)));
      guard.hidden = false;
      message.textContent = "The activation guard refused; see below.";
      $("#force-activate").focus();
    } else {
      message.textContent = `Not done: ${err.message}`;
    }
  }
}

for (const button of $$("button.activate")) {
  button.addEventListener("click", () => request("/api/v1/admin/models/activate", { ref: button.dataset.ref, force: false }));
}
const rollback = $("#rollback");
if (rollback) rollback.addEventListener("click", () => request("/api/v1/admin/models/rollback", { force: false }));
$("#force-activate").addEventListener("click", () => { if (pending) request(pending.path, pending.json); });
$("#guard-cancel").addEventListener("click", () => { guard.hidden = true; pending = null; message.textContent = "Cancelled."; });
