// The worklist: live refresh by polling /worklist/rows with the last ETag (the server
// answers 304 while nothing changed), and the keyboard: j / k move, Enter opens, / searches.
const table = $("#worklist");
const status = $("#refresh-status");
let etag = table.dataset.etag || null;  // of the rows the page was rendered with
let selectedId = null;

function rows() { return $$("#rows tr.study"); }

function select(row, focus = true) {
  for (const r of rows()) r.classList.toggle("selected", r === row);
  if (!row) return;
  selectedId = row.dataset.id;
  const link = $("a.open", row);
  if (focus && link) link.focus();
  row.scrollIntoView({ block: "nearest" });
}

function move(step) {
  const all = rows();
  if (!all.length) return;
  const at = all.findIndex((r) => r.dataset.id === selectedId);
  const next = at < 0 ? 0 : Math.min(all.length - 1, Math.max(0, at + step));
  select(all[next]);
}

function typing(target) {
  return target && (target.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName));
}

document.addEventListener("keydown", (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey || typing(event.target)) return;
  if (event.key === "j") { event.preventDefault(); move(1); }
  else if (event.key === "k") { event.preventDefault(); move(-1); }
  else if (event.key === "/") { event.preventDefault(); $("#q").focus(); }
  else if (event.key === "Enter" && selectedId && !(event.target && event.target.tagName === "A")) {
    const row = rows().find((r) => r.dataset.id === selectedId);
    if (row) $("a.open", row).click();
  }
});

$("#rows").addEventListener("focusin", (event) => {
  const row = event.target.closest("tr.study");
  if (row) select(row, false);
});

async function refresh() {
  const headers = etag ? { "If-None-Match": etag } : {};
  const rsp = await fetch("/worklist/rows" + window.location.search, { headers, credentials: "same-origin" });
  if (rsp.status === 401) { toLogin(); return; }
  if (rsp.status === 304) return;
  if (!rsp.ok) { status.textContent = `Refresh failed (HTTP ${rsp.status}); retrying.`; return; }
  etag = rsp.headers.get("ETag");
  const html = await rsp.text();
  const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest("#rows");
  const holder = document.createElement("table");
  holder.innerHTML = html;  // server-rendered and escaped by Jinja; contains no scripts
  $("#rows").replaceWith(holder.querySelector("tbody"));
  $("#rows").addEventListener("focusin", (event) => {
    const row = event.target.closest("tr.study");
    if (row) select(row, false);
  });
  const again = rows().find((r) => r.dataset.id === selectedId);
  if (again) select(again, Boolean(focused));
  status.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
}

const seconds = Number(table.dataset.refreshSeconds) || 5;
setInterval(() => refresh().catch(() => {}), seconds * 1000);
