// Admin page over /api/v1/audit: every access to patient data and every security event.

function query() {
  const params = new URLSearchParams();
  if ($("#patient").value.trim()) params.set("patient", $("#patient").value.trim());
  if ($("#since").value) params.set("since", $("#since").value);
  return params;
}

async function showRecords() {
  const body = await api("/api/v1/audit?" + query().toString());
  const tbody = $("#records tbody");
  tbody.replaceChildren();
  for (const r of body.records) {
    const tr = document.createElement("tr");
    tr.className = "audit-record";
    tr.append(text("td", r.seq), text("td", r.time_utc), text("td", r.event), text("td", r.event_type),
              text("td", r.outcome, r.outcome === "success" ? "" : "bad"), text("td", r.user), text("td", r.role),
              text("td", r.address), text("td", r.patients), text("td", r.description));
    tbody.append(tr);
  }
  const chain = await api("/api/v1/audit/verify");
  $("#chain").textContent = chain.ok ? `Hash chain intact: ${chain.records} records.` : `Hash chain BROKEN: ${chain.first_break}`;
}

$("#audit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showRecords().catch(console.error);
});

$("#export").addEventListener("click", (event) => {
  event.preventDefault();
  const params = query();
  if (!params.has("since")) params.set("since", "1970-01-01");
  window.location.assign("/api/v1/audit/export.csv?" + params.toString());
});

showRecords().catch(console.error);
