// The study page: the viewer over /api/v1/read/{study}/images and .../heatmaps,
// the image tabs, the heatmap toggles, and feedback saved per finding.
const canvas = $("#viewer");

if (canvas) {
  const study = canvas.dataset.study;
  const version = canvas.dataset.version;
  const images = JSON.parse(canvas.dataset.images);
  const viewer = new CarinaViewer(canvas);
  viewer.bindToolbar();
  let current = images[0];

  const base = `/api/v1/read/${study}`;
  const imageUrl = (im) => `${base}/images/${encodeURIComponent(im.sop_instance_uid)}.png?version=${version}`;
  const heatmapUrl = (im, label) =>
    `${base}/heatmaps/${encodeURIComponent(im.sop_instance_uid)}/${encodeURIComponent(label)}.png?version=${version}`;
  const panel = (im) => $(`.image-findings[data-sop="${CSS.escape(im.sop_instance_uid)}"]`);

  async function show(im) {
    current = im;
    for (const p of $$(".image-findings")) p.hidden = p.dataset.sop !== im.sop_instance_uid;
    for (const tab of $$(".image-tab")) tab.setAttribute("aria-pressed", String(tab.dataset.sop === im.sop_instance_uid));
    await viewer.setImage(imageUrl(im), im.source_shape, im.findings);
    // Overlays that were switched on for this image stay on.
    for (const box of $$(".heatmap-toggle:checked", panel(im))) await viewer.setHeatmap(box.dataset.label, heatmapUrl(im, box.dataset.label));
  }

  for (const tab of $$(".image-tab")) {
    tab.addEventListener("click", () => show(images.find((im) => im.sop_instance_uid === tab.dataset.sop)));
  }

  for (const box of $$(".heatmap-toggle")) {
    box.addEventListener("change", async () => {
      const owner = box.closest(".image-findings").dataset.sop;
      if (owner !== current.sop_instance_uid) return;
      canvas.dataset.overlays = "loading";
      await viewer.setHeatmap(box.dataset.label, box.checked ? heatmapUrl(current, box.dataset.label) : null);
      canvas.dataset.overlays = String(viewer.overlays.size);
    });
  }

  for (const form of $$(".feedback-form")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const saved = $(".saved", form);
      const verdict = form.elements.verdict.value;
      if (!verdict) {
        saved.textContent = "choose agree, disagree or uncertain";
        return;
      }
      saved.textContent = "saving…";
      try {
        const row = await api(`${base}/feedback`, {
          method: "PUT",
          json: { version: Number(version), sop_instance_uid: form.dataset.sop, label: form.dataset.label,
                  verdict, comment: form.elements.comment.value },
        });
        saved.textContent = `saved ${row.updated_at.replace("T", " ").slice(0, 16)} UTC`;
        form.dataset.feedbackId = row.id;
      } catch (err) {
        saved.textContent = `not saved: ${err.message}`;
      }
    });
  }

  show(current).catch((err) => { canvas.setAttribute("aria-label", `The image cannot be shown: ${err.message}`); });
}
