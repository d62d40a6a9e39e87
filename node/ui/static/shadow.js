// Shadow-mode admin page: a view over GET /api/v1/shadow (admin-only).
const $ = (sel) => document.querySelector(sel);
const tokenKey = "carina-token";
const auth = () => ({ Authorization: "Bearer " + (localStorage.getItem(tokenKey) || "") });
const fmt = (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(3));
const pair = (fb, who) => (fb[who] ? `${fmt(fb[who].sensitivity.value)} / ${fmt(fb[who].specificity.value)}` : "—");

async function load() {
  const rsp = await fetch("/api/v1/shadow", { headers: auth() });
  if (rsp.status === 401 || rsp.status === 403) { $("#login").hidden = false; return; }
  const view = await rsp.json();
  $("#login").hidden = true;
  $("#model").textContent = view.shadow_model ? `candidate ${view.shadow_model}` : "no shadow results yet";
  const actives = Object.entries(view.active_models || {}).map(([k, v]) => `${k} (${v} images)`).join(", ");
  $("#summary").textContent = `${view.images} images in ${view.studies} studies; active model: ${actives || "—"}`;
  const tbody = $("#shadow tbody");
  tbody.replaceChildren();
  for (const [label, row] of Object.entries(view.pathologies || {})) {
    const a = row.agreement, fb = row.feedback;
    const tr = document.createElement("tr");
    for (const value of [label, a.n, fmt(a.positive_agreement), fmt(a.negative_agreement), fmt(a.kappa),
                         fb.images, pair(fb, "active"), pair(fb, "shadow")]) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(td);
    }
    tbody.append(tr);
  }
}

$("#csv").addEventListener("click", async (event) => {
  event.preventDefault();
  const rsp = await fetch("/api/v1/shadow.csv", { headers: auth() });
  const url = URL.createObjectURL(await rsp.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: "shadow.csv" });
  link.click();
  URL.revokeObjectURL(url);
});
$("#save-token").addEventListener("click", () => { localStorage.setItem(tokenKey, $("#token").value.trim()); load(); });
load();
