"use strict";
// app.js: page state (stage, diff base, expanded modules, selection, pan/zoom) and event wiring.
// The state is mirrored in location.hash (#stage=1&base=0&expand=g:encoder), so a view can be shared.

FX.App = class {
  constructor(data) {
    this.model = new FX.Model(data);
    this.stage = this.model.stages.length - 1;
    this.base = null;
    this.expanded = new Set();
    this.selected = null;
    this.zoom = {x: 20, y: 20, k: 1};
    this.$ = (id) => document.getElementById(id);
    this.readHash();
    this.buildControls();
    this.bindEvents();
    this.render();
    this.fit();
  }

  readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const count = this.model.stages.length;
    const stage = Number(params.get("stage"));
    if (params.has("stage") && stage >= 0 && stage < count) this.stage = stage;
    const base = Number(params.get("base"));
    if (params.has("base") && base >= 0 && base < this.stage) this.base = base;
    for (const gid of (params.get("expand") || "").split(",")) if (gid in this.model.groups) this.expanded.add(gid);
  }

  writeHash() {
    const params = new URLSearchParams({stage: this.stage});
    if (this.base !== null) params.set("base", this.base);
    if (this.expanded.size && this.expanded.size < 40) params.set("expand", [...this.expanded].join(","));
    history.replaceState(null, "", "#" + params.toString());
  }

  buildControls() {
    this.$("stages").innerHTML = this.model.stages.map((s, i) =>
      `<button data-stage="${i}">${FX.esc(s.name)}</button>`).join("");
    this.$("defs").innerHTML = FX.markers(this.model.data.colors);
    if (this.model.stages.length < 2) this.$("diff").closest("label").hidden = true;
  }

  syncControls() {
    for (const button of this.$("stages").children) {
      button.classList.toggle("active", Number(button.dataset.stage) === this.stage);
    }
    const base = this.$("base");
    base.innerHTML = this.model.stages.slice(0, Math.max(this.stage, 1)).map((s, i) =>
      `<option value="${i}">${FX.esc(s.name)}</option>`).join("");
    base.value = String(this.base ?? Math.max(this.stage - 1, 0));
    this.$("diff").checked = this.base !== null;
    this.$("diff").disabled = this.stage === 0;
  }

  bindEvents() {
    this.$("stages").addEventListener("click", (e) => {
      const button = e.target.closest("button");
      if (!button) return;
      this.stage = Number(button.dataset.stage);
      if (this.base !== null) this.base = this.stage > 0 ? Math.min(this.base, this.stage - 1) : null;
      this.render();
    });
    this.$("diff").addEventListener("change", (e) => {
      this.base = e.target.checked ? Number(this.$("base").value) : null;
      this.render();
    });
    this.$("base").addEventListener("change", (e) => {
      this.base = Number(e.target.value);
      this.render();
    });
    this.$("search").addEventListener("input", () => this.renderResults());
    this.$("search").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && this.hits && this.hits.length) this.reveal(this.hits[0].item);
      if (e.key === "Escape") { e.target.value = ""; this.renderResults(); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "/" && document.activeElement !== this.$("search")) {
        e.preventDefault();
        this.$("search").focus();
      }
    });
    this.$("expand-all").addEventListener("click", () => {
      this.expanded = new Set(Object.keys(this.model.groups));
      this.render();
      this.fit();
    });
    this.$("collapse-all").addEventListener("click", () => {
      this.expanded.clear();
      this.render();
      this.fit();
    });
    this.$("fit").addEventListener("click", () => this.fit());
    this.$("side").addEventListener("click", (e) => {
      const link = e.target.closest("[data-reveal]");
      if (!link) return;
      e.preventDefault();
      this.reveal(link.dataset.reveal);
    });
    this.$("viewport").addEventListener("click", (e) => this.onGraphClick(e));
    this.$("viewport").addEventListener("dblclick", (e) => {
      const frame = e.target.closest(".frame");
      if (frame) this.zoomTo(frame.dataset.id);
    });
    this.bindPanZoom();
  }

  onGraphClick(e) {
    const target = e.target.closest("[data-id]");
    if (!target || this.dragged) return;
    const item = target.dataset.id;
    const kind = target.classList.contains("group") ? "group" : target.classList.contains("frame") ? "frame" : "node";
    const box = this.boxes.get(item);
    if (kind === "group") {
      this.toggle(item, true);
    } else if (kind === "frame") {
      // Only the header collapses a frame; a click on its body just selects the module.
      const [, y] = this.toGraph(e.clientX, e.clientY);
      if (y - box.y <= 22 && item !== FX.ROOT) this.toggle(item, false);
      else this.select(item);
    } else {
      this.select(item);
    }
  }

  /** Open or close a module, keeping it still on screen. */
  toggle(gid, open) {
    const before = this.boxes.get(gid);
    if (open) this.expanded.add(gid);
    else for (const g of [...this.expanded]) if (g === gid || this.model.ancestors[g].includes(gid)) this.expanded.delete(g);
    this.selected = gid;
    this.render();
    const after = this.boxes.get(gid);
    if (before && after) {
      this.zoom.x += (before.x - after.x) * this.zoom.k;
      this.zoom.y += (before.y - after.y) * this.zoom.k;
      this.applyZoom();
    }
  }

  select(item) {
    this.selected = item;
    this.render();
  }

  /** Expand every module above an item, select it and centre it. */
  reveal(item) {
    if (!(item in this.model.parent) && item !== FX.ROOT) return;
    for (const gid of this.model.ancestors[item]) if (gid !== FX.ROOT) this.expanded.add(gid);
    this.selected = item;
    this.render();
    const box = this.boxes.get(item);
    if (!box) return;
    const rect = this.$("canvas").getBoundingClientRect();
    this.zoom.k = Math.max(this.zoom.k, 0.8);
    this.zoom.x = rect.width / 2 - (box.x + box.w / 2) * this.zoom.k;
    this.zoom.y = rect.height / 2 - (box.y + box.h / 2) * this.zoom.k;
    this.applyZoom();
  }

  render() {
    this.syncControls();
    this.view = this.model.view(this.stage, this.base);
    const visible = this.model.visible(this.view, this.expanded);
    this.boxes = this.model.layout(this.view, this.expanded);
    if (this.selected && !this.boxes.has(this.selected)) this.selected = null;
    this.$("viewport").innerHTML = FX.draw(this.model, this.view, this.expanded, this.boxes, visible, this.selected);
    this.$("legend").innerHTML = FX.legend(this.model, this.view);
    this.$("details").innerHTML = FX.details(this.model, this.view, this.selected);
    this.$("changes").innerHTML = FX.changes(this.model, this.view);
    this.$("changes").hidden = this.view.base === null;
    this.renderResults();
    this.applyZoom();
    this.writeHash();
    document.body.dataset.items = String(this.boxes.size);  // read by tests
  }

  renderResults() {
    const query = this.$("search").value;
    this.hits = FX.search(this.model, this.view, query);
    this.$("results").innerHTML = FX.results(this.hits, query);
    this.$("results").hidden = !query.trim();
  }

  bindPanZoom() {
    const canvas = this.$("canvas");
    let start = null;
    canvas.addEventListener("pointerdown", (e) => {
      start = {x: e.clientX, y: e.clientY, zx: this.zoom.x, zy: this.zoom.y};
      this.dragged = false;
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!start) return;
      const dx = e.clientX - start.x, dy = e.clientY - start.y;
      if (Math.abs(dx) + Math.abs(dy) > 4) this.dragged = true;
      if (!this.dragged) return;
      this.zoom.x = start.zx + dx;
      this.zoom.y = start.zy + dy;
      this.applyZoom();
    });
    window.addEventListener("pointerup", () => { start = null; setTimeout(() => { this.dragged = false; }); });
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      const rect = canvas.getBoundingClientRect();
      const px = e.clientX - rect.left, py = e.clientY - rect.top;
      const k = Math.min(3, Math.max(0.05, this.zoom.k * Math.exp(-e.deltaY * 0.0015)));
      this.zoom.x = px - (px - this.zoom.x) * (k / this.zoom.k);
      this.zoom.y = py - (py - this.zoom.y) * (k / this.zoom.k);
      this.zoom.k = k;
      this.applyZoom();
    }, {passive: false});
  }

  toGraph(clientX, clientY) {
    const rect = this.$("canvas").getBoundingClientRect();
    return [(clientX - rect.left - this.zoom.x) / this.zoom.k, (clientY - rect.top - this.zoom.y) / this.zoom.k];
  }

  /** Zoom so that an item's box fills the canvas (at most 100%), its top at the top. */
  zoomTo(item) {
    const box = this.boxes.get(item);
    const rect = this.$("canvas").getBoundingClientRect();
    if (!box || !rect.width) return;
    this.zoom.k = Math.min(1, (rect.width - 30) / box.w, (rect.height - 30) / box.h);
    this.zoom.x = (rect.width - box.w * this.zoom.k) / 2 - box.x * this.zoom.k;
    this.zoom.y = 15 - box.y * this.zoom.k;
    this.applyZoom();
  }

  applyZoom() {
    const {x, y, k} = this.zoom;
    this.$("viewport").setAttribute("transform", `translate(${x},${y}) scale(${k})`);
  }

  /** Fit the width (never above 100%) and show the top: models are tall, the top is where they start. */
  fit() {
    const root = this.boxes.get(FX.ROOT);
    const rect = this.$("canvas").getBoundingClientRect();
    if (!root || !rect.width) return;
    this.zoom.k = Math.min(1, (rect.width - 40) / root.w, Math.max((rect.height - 40) / root.h, 0.35));
    this.zoom.x = (rect.width - root.w * this.zoom.k) / 2;
    this.zoom.y = 20;
    this.applyZoom();
  }
};

window.addEventListener("DOMContentLoaded", () => {
  const data = JSON.parse(document.getElementById("fxadapt-data").textContent);
  window.fxadapt = new FX.App(data);
});
