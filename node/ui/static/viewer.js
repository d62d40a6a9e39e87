// The image viewer: the radiograph on a canvas, zoom and pan, heatmap overlays with
// one opacity, and the findings' region outlines. Used by the study page (study.js)
// and the upload page (upload.js); it knows nothing about where its pictures come from.
//
// Coordinates: the image is drawn at its natural size under a transform (scale, tx, ty);
// outlines arrive in source pixel coordinates (array indices, centres at integers) and
// are mapped through the source-to-rendition ratio, as the heatmap SCs do.
class CarinaViewer {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.image = null;
    this.sourceShape = [1, 1]; // [rows, columns] of the stored image
    this.findings = [];
    this.overlays = new Map(); // label -> loaded <img>
    this.opacity = 0.5;
    this.outlines = true;
    this.view = { scale: 1, tx: 0, ty: 0 };
    this.drag = null;
    this.generation = 0; // drops overlays that finish loading after the image changed
    this.bind();
    new ResizeObserver(() => this.resize()).observe(canvas);
  }

  load(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("cannot load " + url.slice(0, 80)));
      img.src = url;
    });
  }

  async setImage(url, sourceShape, findings) {
    this.generation += 1;
    this.overlays.clear();
    this.sourceShape = sourceShape;
    this.findings = findings || [];
    this.image = await this.load(url);
    this.canvas.dataset.loaded = String(this.generation);
    this.fit();
  }

  async setHeatmap(label, url) {
    if (!url) {
      this.overlays.delete(label);
      this.draw();
      return;
    }
    const generation = this.generation;
    const img = await this.load(url);
    if (generation !== this.generation) return;
    this.overlays.set(label, img);
    this.draw();
  }

  setOpacity(value) { this.opacity = value; this.draw(); }
  setOutlines(on) { this.outlines = on; this.draw(); }

  resize() {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(this.canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(this.canvas.clientHeight * ratio));
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
      this.fit();
    }
  }

  fit() {
    if (!this.image) return this.draw();
    const { width, height } = this.canvas;
    const scale = Math.min(width / this.image.naturalWidth, height / this.image.naturalHeight);
    this.view = { scale, tx: (width - this.image.naturalWidth * scale) / 2, ty: (height - this.image.naturalHeight * scale) / 2 };
    this.draw();
  }

  zoom(factor, cx = this.canvas.width / 2, cy = this.canvas.height / 2) {
    const v = this.view;
    const scale = Math.min(40, Math.max(0.05, v.scale * factor));
    const k = scale / v.scale;
    this.view = { scale, tx: cx - (cx - v.tx) * k, ty: cy - (cy - v.ty) * k };
    this.draw();
  }

  pan(dx, dy) {
    this.view.tx += dx;
    this.view.ty += dy;
    this.draw();
  }

  draw() {
    const { ctx, canvas } = this;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!this.image) return;
    const { scale, tx, ty } = this.view;
    const w = this.image.naturalWidth, h = this.image.naturalHeight;
    ctx.setTransform(scale, 0, 0, scale, tx, ty);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(this.image, 0, 0);
    ctx.globalAlpha = this.opacity;
    for (const overlay of this.overlays.values()) ctx.drawImage(overlay, 0, 0, w, h);
    ctx.globalAlpha = 1;
    if (this.outlines) this.drawOutlines(w, h, scale);
  }

  drawOutlines(w, h, scale) {
    const { ctx } = this;
    const kx = w / this.sourceShape[1], ky = h / this.sourceShape[0];
    ctx.lineWidth = 2 / scale;
    ctx.strokeStyle = "#00ff00";
    ctx.fillStyle = "#00ff00";
    ctx.font = `${Math.round(14 / scale)}px system-ui, sans-serif`;
    for (const finding of this.findings) {
      if (!finding.positive) continue;
      for (const polygon of finding.regions) {
        if (!polygon.length) continue;
        ctx.beginPath();
        polygon.forEach(([x, y], i) => {
          const px = (x + 0.5) * kx, py = (y + 0.5) * ky;
          if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
        });
        ctx.closePath();
        ctx.stroke();
        const top = polygon.reduce((a, b) => (b[1] < a[1] ? b : a));
        ctx.fillText(finding.name, (top[0] + 0.5) * kx, (top[1] + 0.5) * ky - 4 / scale);
      }
    }
  }

  bind() {
    const c = this.canvas;
    const point = (event) => {
      const r = c.getBoundingClientRect();
      const ratio = c.width / r.width;
      return [(event.clientX - r.left) * ratio, (event.clientY - r.top) * ratio];
    };
    c.addEventListener("wheel", (event) => {
      event.preventDefault();
      const [x, y] = point(event);
      this.zoom(Math.exp(-event.deltaY * 0.0015), x, y);
    }, { passive: false });
    c.addEventListener("pointerdown", (event) => {
      c.setPointerCapture(event.pointerId);
      this.drag = point(event);
    });
    c.addEventListener("pointermove", (event) => {
      if (!this.drag) return;
      const [x, y] = point(event);
      this.pan(x - this.drag[0], y - this.drag[1]);
      this.drag = [x, y];
    });
    const end = () => { this.drag = null; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("keydown", (event) => {
      const step = 40 * (window.devicePixelRatio || 1);
      const keys = {
        "+": () => this.zoom(1.25), "=": () => this.zoom(1.25), "-": () => this.zoom(0.8), "0": () => this.fit(),
        ArrowLeft: () => this.pan(step, 0), ArrowRight: () => this.pan(-step, 0),
        ArrowUp: () => this.pan(0, step), ArrowDown: () => this.pan(0, -step),
      };
      if (keys[event.key]) { event.preventDefault(); keys[event.key](); }
    });
  }

  // The toolbar every viewer page has: zoom buttons, outlines, opacity.
  bindToolbar() {
    $("#zoom-in").addEventListener("click", () => this.zoom(1.25));
    $("#zoom-out").addEventListener("click", () => this.zoom(0.8));
    $("#zoom-fit").addEventListener("click", () => this.fit());
    $("#outlines").addEventListener("change", (event) => this.setOutlines(event.target.checked));
    const opacity = $("#opacity");
    const shown = $("#opacity-value");
    const apply = () => {
      this.setOpacity(Number(opacity.value) / 100);
      shown.textContent = `${opacity.value} %`;
    };
    opacity.addEventListener("input", apply);
    apply();
  }
}
