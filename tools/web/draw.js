"use strict";
// draw.js: SVG markup for one laid-out view. Built as one string and set with innerHTML: far faster
// than creating thousands of DOM nodes one by one when a whole model is expanded.

FX.esc = (text) => String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  "\"": "&quot;", "'": "&#39;"})[c]);

FX.fit = (text, limit) => (text.length <= limit ? text : text.slice(0, limit - 1) + "…");

FX.markers = (colors) => {
  const all = [["plain", "#64748b"], ...Object.entries(colors.diff)];
  return all.map(([name, color]) => `<marker id="arrow-${name}" viewBox="0 0 10 10" refX="9" refY="5" ` +
    `markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" ` +
    `fill="${color}"/></marker>`).join("");
};

FX.draw = function (model, view, expanded, boxes, visible, selected) {
  const colors = model.data.colors;
  const out = [];
  const frames = [...boxes.entries()].filter(([, b]) => b.kind === "frame")
    .sort((a, b) => model.ancestors[a[0]].length - model.ancestors[b[0]].length);
  for (const [gid, box] of frames) out.push(FX.drawFrame(model, view, gid, box, selected));
  for (const [a, b, kind] of visible.edges) {
    const from = boxes.get(a), to = boxes.get(b);
    if (from && to) out.push(FX.drawEdge(from, to, kind, colors));
  }
  for (const [item, box] of boxes) {
    if (box.kind === "node") out.push(FX.drawNode(model, view, item, box, selected));
    else if (box.kind === "group") out.push(FX.drawGroup(model, view, item, box, selected));
  }
  return out.join("");
};

FX.drawEdge = (a, b, kind, colors) => {
  const x1 = a.x + a.w / 2, y1 = a.y + a.h, x2 = b.x + b.w / 2, y2 = b.y;
  const bend = Math.max(Math.abs(y2 - y1) / 2, 20);
  const color = kind ? colors.diff[kind] : "#94a3b8";
  return `<path class="edge ${kind}" d="M${x1},${y1} C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2}" ` +
    `stroke="${color}" marker-end="url(#arrow-${kind || "plain"})"/>`;
};

FX.drawNode = (model, view, item, box, selected) => {
  const uid = item.slice(2);
  const record = view.records.get(uid);
  const status = view.status.get(uid) || "";
  const origin = record.origin;
  const fill = origin ? ` style="fill:${model.data.colors.adapters[FX.adapterKey(origin)]}"` : "";
  const cls = `node cat-${model.data.category[uid]}${origin ? " adapter" : ""} ${status}` +
    `${item === selected ? " selected" : ""}`;
  const cx = box.x + box.w / 2;
  // A node with adapters merged into its weights carries a bar per adapter, in the adapter's colour.
  const bars = (record.merged || []).map((m, i) => `<rect x="${box.x + 3 + 6 * i}" y="${box.y + 4}" width="4" ` +
    `height="${box.h - 8}" rx="2" style="fill:${model.data.colors.adapters[FX.adapterKey(m)]};stroke:none"/>`);
  return `<g class="${cls}" data-id="${FX.esc(item)}"><title>${FX.esc(record.name)}  ${FX.esc(record.target)}` +
    `  ${FX.esc(FX.shapeText(record))}</title>` +
    `<rect x="${box.x}" y="${box.y}" width="${box.w}" height="${box.h}" rx="6"${fill}/>${bars.join("")}` +
    `<text class="t1" x="${cx}" y="${box.y + 17}">${FX.esc(FX.fit(model.data.title[uid], 22))}</text>` +
    `<text class="t2" x="${cx}" y="${box.y + 31}">${FX.esc(FX.fit(record.name, 26))}</text></g>`;
};

FX.drawGroup = (model, view, gid, box, selected) => {
  const group = model.groups[gid];
  const info = model.summary(view, gid);
  const type = group.type ? group.type.split(".").pop() : `${(model.descendants[gid] || []).length} ops`;
  return `<g class="group${gid === selected ? " selected" : ""}" data-id="${FX.esc(gid)}">` +
    `<title>${FX.esc(group.path || "model")}  (${FX.esc(group.type || "folded ops")}) — click to expand</title>` +
    `<rect x="${box.x}" y="${box.y}" width="${box.w}" height="${box.h}" rx="8"/>` +
    `<rect class="stack" x="${box.x + 4}" y="${box.y + box.h}" width="${box.w - 8}" height="3" rx="1.5"/>` +
    `<text class="t1" x="${box.x + 10}" y="${box.y + 18}">${FX.esc(FX.fit(group.label, 24))}</text>` +
    `<text class="toggle" x="${box.x + box.w - 12}" y="${box.y + 18}">+</text>` +
    `<text class="t2" x="${box.x + 10}" y="${box.y + 32}">${FX.esc(FX.fit(type, 30))}</text>` +
    FX.chips(model, info, box.x + 10, box.y + box.h - 17, false).svg + "</g>";
};

FX.drawFrame = (model, view, gid, box, selected) => {
  const group = model.groups[gid];
  const type = group.type ? group.type.split(".").pop() : "";
  const header = type && type !== group.label ? `${group.label} · ${type}` : group.label;
  const chips = FX.chips(model, model.summary(view, gid), box.x + box.w - 28, box.y + 7, true);
  // Header text gets what the chips leave (about 6.5 px per character at 11 px).
  const room = Math.max(8, Math.floor((box.w - chips.width - 50) / 6.5));
  return `<g class="frame depth-${group.depth % 4}${gid === selected ? " selected" : ""}" data-id="${FX.esc(gid)}">` +
    `<title>${FX.esc(group.path || "model")}  (${FX.esc(group.type || "folded ops")})</title>` +
    `<rect x="${box.x}" y="${box.y}" width="${box.w}" height="${box.h}" rx="10"/>` +
    `<rect class="header" x="${box.x}" y="${box.y}" width="${box.w}" height="22" rx="10"/>` +
    `<text class="t1" x="${box.x + 10}" y="${box.y + 16}">${FX.esc(FX.fit(header, room))}</text>` +
    (gid === FX.ROOT ? "" : `<text class="toggle" x="${box.x + box.w - 12}" y="${box.y + 16}">−</text>`) +
    chips.svg + "</g>";
};

/** Tags for a module: adapters inside (filled), then +inserted / −removed / ⊕merged (outlined). */
FX.chips = (model, info, x, y, rightAligned) => {
  const tags = [...info.adapters.keys()].sort()
    .map((key) => ({text: key.split("/")[0], color: model.data.colors.adapters[key], filled: true}));
  const marks = {inserted: "+", removed: "−", merged: "⊕"};
  for (const [key, mark] of Object.entries(marks)) {
    if (info.changes[key]) tags.push({text: mark + info.changes[key], color: model.data.colors.diff[key]});
  }
  const widths = tags.map((t) => 10 + 6.5 * t.text.length);
  const width = widths.reduce((s, w) => s + w + 4, 0);
  if (rightAligned) x -= width;
  const svg = tags.map((tag, i) => {
    const w = widths[i];
    const chip = `<g class="chip${tag.filled ? " filled" : ""}"><rect x="${x}" y="${y}" width="${w}" height="13" ` +
      `rx="6.5" style="${tag.filled ? "fill" : "stroke"}:${tag.color}"/><text x="${x + w / 2}" y="${y + 10}" ` +
      `style="fill:${tag.filled ? "#fff" : tag.color}">${FX.esc(tag.text)}</text></g>`;
    x += w + 4;
    return chip;
  }).join("");
  return {svg, width};
};
