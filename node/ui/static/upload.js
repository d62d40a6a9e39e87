// The upload page: send one DICOM, PNG, JPEG or a zip to POST /api/v1/upload and
// read its NDJSON answer line by line as each image is scored (the progress bar),
// then show any result in the same viewer as a study.
const form = $("#upload-form");
const input = $("#file");
const drop = $("#drop");
const progress = $("#progress");
const progressText = $("#progress-text");
const list = $("#results");
const reader = $("#upload-reader");
const viewer = new CarinaViewer($("#viewer"));
viewer.bindToolbar();
const results = [];

function fmt(value) { return Number(value).toFixed(3); }

async function showResult(result) {
  reader.hidden = false;
  const view = result.view;
  const meta = result.metadata;
  $("#upload-model").textContent = `${result.name} · ${meta.model_name} ${meta.model_version}`;
  const demo = $("#upload-demo");
  demo.hidden = !meta.demo;
  demo.textContent = meta.caveat || "";
  const tbody = $("#upload-findings tbody");
  tbody.replaceChildren();
  for (const f of view.findings) {
    const tr = document.createElement("tr");
    tr.className = "finding" + (f.positive ? " positive" : "");
    tr.dataset.label = f.label;
    const name = text("th", f.name);
    name.scope = "row";
    const verdict = document.createElement("td");
    verdict.append(f.positive ? text("span", "positive", "chip") : document.createTextNode("negative"));
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.className = "heatmap-toggle";
    toggle.dataset.label = f.label;
    toggle.setAttribute("aria-label", `Show the heatmap of ${f.name}`);
    toggle.addEventListener("change", () => viewer.setHeatmap(f.label, toggle.checked ? view.heatmaps[f.label] : null));
    const cell = document.createElement("td");
    cell.append(toggle);
    tr.append(name, text("td", fmt(f.probability), "num"), text("td", fmt(f.threshold), "num"), verdict,
              text("td", f.severity || "—"), cell);
    tbody.append(tr);
  }
  await viewer.setImage(view.image, view.source_shape, view.findings);
  $("#viewer").focus();
}

function addResult(line) {
  const li = document.createElement("li");
  li.className = "upload-result " + line.status;
  li.append(text("span", line.name, "name"));
  if (line.status === "success") {
    results[line.index] = line;
    const positives = line.view.findings.filter((f) => f.positive).map((f) => f.name);
    li.append(text("span", positives.length ? ` positive: ${positives.join(", ")}` : " no positive finding", "summary"));
    const button = text("button", "View", "small");
    button.type = "button";
    button.setAttribute("aria-label", `View the result of ${line.name}`);
    button.addEventListener("click", () => showResult(line));
    li.append(" ", button);
  } else {
    li.append(text("span", ` not scored (HTTP ${line.http_status}): ${line.reason}`, "error"));
  }
  list.append(li);
}

function send(file) {
  list.replaceChildren();
  reader.hidden = true;
  results.length = 0;
  progress.max = 1;
  progress.value = 0;
  progressText.textContent = `Sending ${file.name}…`;
  const body = new FormData();
  body.append("file", file);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/v1/upload");
  xhr.setRequestHeader("X-CSRF-Token", csrfToken());
  let seen = 0;
  let total = 1;
  let done = 0;
  let first = true;
  xhr.upload.onprogress = (event) => {
    if (event.lengthComputable) progressText.textContent = `Sending ${Math.round((100 * event.loaded) / event.total)} %…`;
  };
  const consume = () => {
    const lines = xhr.responseText.slice(seen).split("\n");
    const complete = lines.slice(0, -1);
    seen += complete.reduce((n, l) => n + l.length + 1, 0);
    for (const raw of complete) {
      if (!raw.trim()) continue;
      const line = JSON.parse(raw);
      if (line.type === "start") {
        total = line.total;
        progress.max = total;
        progressText.textContent = `Scoring 0 of ${total}…`;
      } else if (line.type === "result") {
        done += 1;
        progress.value = done;
        progressText.textContent = `Scored ${done} of ${total}.`;
        addResult(line);
        if (first && line.status === "success") { first = false; showResult(line); }
      } else if (line.type === "done") {
        progressText.textContent = `Done: ${line.scored} scored, ${line.failed} not scored.`;
      }
    }
  };
  xhr.onprogress = () => { if (xhr.status === 200) consume(); };
  xhr.onload = () => {
    if (xhr.status === 401) { toLogin(); return; }
    if (xhr.status !== 200) {
      let reason = `HTTP ${xhr.status}`;
      try { reason = JSON.parse(xhr.responseText).reason || JSON.parse(xhr.responseText).detail || reason; } catch (e) { /* not JSON */ }
      progressText.textContent = `Refused: ${reason}`;
      return;
    }
    consume();
  };
  xhr.onerror = () => { progressText.textContent = "The upload failed (connection)."; };
  xhr.send(body);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (input.files.length) send(input.files[0]);
  else progressText.textContent = "Choose a file first.";
});

drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) send(event.dataTransfer.files[0]);
});
