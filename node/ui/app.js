// Carina operator UI: a thin view over /api/v1; all state lives in the node.

async function showHealth() {
  const rsp = await fetch("/healthz");
  const body = await rsp.json();
  if (body.model) {
    $("#model").textContent = `${body.model.name} ${body.model.version}`;
    if (body.model.demo) {
      $("#demo-banner").textContent = body.model.caveat;
      $("#demo-banner").hidden = false;
    }
  }
}

async function showStudies() {
  const body = await api("/api/v1/studies?limit=100");
  $("#counts").textContent = Object.entries(body.counts).map(([k, v]) => `${k}: ${v}`).join(" · ");
  const tbody = $("#studies tbody");
  tbody.replaceChildren();
  for (const st of body.studies) {
    const tr = document.createElement("tr");
    tr.className = "study";
    tr.dataset.uid = st.study_instance_uid;
    tr.append(
      text("td", st.study_instance_uid),
      text("td", st.calling_ae),
      text("td", st.state + (st.reason ? ` (${st.reason})` : ""), "state-" + st.state),
      text("td", st.positives.join(", ") || "—", st.positives.length ? "pos" : ""),
      text("td", st.last_received_at),
    );
    tr.addEventListener("click", () => showStudy(st.study_instance_uid, st.calling_ae));
    tbody.append(tr);
  }
}

async function showStudy(uid, callingAe) {
  const st = await api(`/api/v1/studies/${encodeURIComponent(uid)}?calling_ae=${encodeURIComponent(callingAe)}`);
  $("#detail").hidden = false;
  $("#detail-uid").textContent = uid;
  $("#detail-state").textContent = `${st.state} · version ${st.version}` +
    (st.model ? ` · ${st.model.name} ${st.model.version}` : "") + (st.model && st.model.demo ? ` · ${st.model.caveat}` : "");
  // The report of the latest version, when encode kept one (GET /api/v1/studies/{uid}/report.pdf, audited).
  const report = $("#detail-report");
  report.hidden = !(st.state === "done" && st.model);
  report.href = `/api/v1/studies/${encodeURIComponent(uid)}/report.pdf?calling_ae=${encodeURIComponent(callingAe)}`;
  const box = $("#detail-findings");
  box.replaceChildren();
  for (const img of st.images) {
    const table = document.createElement("table");
    table.append(text("caption", "Image " + img.sop_instance_uid));
    for (const f of img.findings) {
      const tr = document.createElement("tr");
      tr.append(text("td", f.label, f.positive ? "pos" : ""), text("td", f.probability.toFixed(3)),
                text("td", "threshold " + f.threshold.toFixed(3)), text("td", f.positive ? "POSITIVE" : "negative", f.positive ? "pos" : ""));
      table.append(tr);
    }
    box.append(table);
  }
  const ul = $("#detail-deliveries");
  ul.replaceChildren(...st.deliveries.map((d) => text("li", `${d.destination}: ${d.state} (attempts ${d.attempts})` + (d.last_error ? ` — ${d.last_error}` : ""))));
}

showHealth().catch(console.error);
startSession().then(() => {
  showStudies().catch(console.error);
  setInterval(() => showStudies().catch(() => {}), 5000);
}).catch(() => {});
