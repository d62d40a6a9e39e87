// System admin page: destination probes (C-ECHO / HTTP / MLLP) and dead-letter retries.
const message = $("#system-message");

async function probe() {
  const table = $("#health");
  if (!table) return;
  for (const row of $$("tbody tr", table)) row.lastElementChild.textContent = "probing…";
  const body = await api("/api/v1/admin/destinations/health");
  for (const d of body.destinations) {
    const row = $(`tr[data-name="${CSS.escape(d.name)}"]`, table);
    if (!row) continue;
    const name = row.firstElementChild;
    const health = text("td", d.ok ? "healthy" : "unreachable", d.ok ? "good" : "bad");
    health.title = d.detail;
    row.replaceChildren(name, text("td", d.type), text("td", d.target), text("td", d.method), health,
                        text("td", `${Math.round(d.milliseconds)} ms`, "num"));
    row.dataset.ok = String(d.ok);
    const detail = text("span", ` ${d.detail}`, "hint");
    health.append(detail);
  }
}

async function retry(path, what) {
  message.textContent = `Re-queueing ${what}…`;
  try {
    const done = await api(path, { method: "POST" });
    message.textContent = `Re-queued ${done.requeued} job(s). Reloading…`;
    window.location.reload();
  } catch (err) {
    message.textContent = `Not re-queued: ${err.message}`;
  }
}

for (const button of $$("button.retry")) {
  button.addEventListener("click", () => retry(`/api/v1/jobs/${button.dataset.job}/retry`, `job ${button.dataset.job}`));
}
for (const button of $$("button.retry-destination")) {
  const destination = button.dataset.destination;
  button.addEventListener("click", () =>
    retry(`/api/v1/admin/dead-letters/retry?destination=${encodeURIComponent(destination)}`, `${destination}'s dead letters`));
}
const again = $("#probe");
if (again) again.addEventListener("click", () => probe().catch((err) => { message.textContent = err.message; }));
probe().catch((err) => { message.textContent = `Probe failed: ${err.message}`; });
