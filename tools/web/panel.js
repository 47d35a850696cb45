"use strict";
// panel.js: the side panel: legend, search results, details of the selection, list of changes.
// Every clickable entry carries data-reveal="<item id>"; app.js turns a click on it into a reveal.

FX.link = (item, text) => `<a href="#" data-reveal="${FX.esc(item)}">${FX.esc(text)}</a>`;

FX.row = (key, value) => (value === "" || value === undefined || value === null ? "" :
  `<tr><th>${FX.esc(key)}</th><td>${value}</td></tr>`);

FX.legend = (model, view) => {
  const colors = model.data.colors;
  const created = new Set(), merged = new Set();
  for (const record of view.records.values()) {
    if (record.origin) created.add(FX.adapterKey(record.origin));
    for (const m of record.merged || []) merged.add(FX.adapterKey(m));
  }
  const items = [...new Set([...created, ...merged])].sort().map((key) => `<span class="swatch" ` +
    `style="background:${colors.adapters[key]}"></span>${FX.esc(key.replace("/", " · "))}` +
    (created.has(key) ? "" : " <small>(merged)</small>"));
  if (view.base !== null) {
    for (const [name, color] of Object.entries(colors.diff)) {
      items.push(`<span class="swatch ring" style="border-color:${color}"></span>${name}`);
    }
  }
  const stage = model.stages[view.stage].name;
  const what = view.base === null ? stage : `${stage} vs ${model.stages[view.base].name}`;
  return `<h3>${FX.esc(what)} <small>${view.records.size} nodes</small></h3>` +
    (items.length ? `<div class="legend-items">${items.map((i) => `<span>${i}</span>`).join("")}</div>` :
      `<p class="hint">No adapter nodes in this stage.</p>`);
};

FX.search = (model, view, query) => {
  const q = query.trim().toLowerCase();
  if (!q) return [];
  const hits = [];
  for (const [gid, group] of Object.entries(model.groups)) {
    if (gid !== FX.ROOT && (model.descendants[gid] || []).some((uid) => view.records.has(uid)) &&
        (group.path + " " + group.type).toLowerCase().includes(q)) {
      hits.push({item: gid, text: group.path + (gid.endsWith("#ops") ? " (ops)" : ""), kind: "module"});
    }
  }
  for (const [uid, record] of view.records) {
    const hay = `${record.name} ${record.target} ${record.module} ${record.origin ? FX.adapterKey(record.origin) : ""}`;
    if (hay.toLowerCase().includes(q)) hits.push({item: "n:" + uid, text: record.name, kind: record.target});
  }
  // Exact and prefix matches first, then modules before nodes, then shorter names.
  const score = (h) => (h.text.toLowerCase() === q ? 0 : h.text.toLowerCase().startsWith(q) ? 1 : 2);
  hits.sort((a, b) => score(a) - score(b) || (a.kind === "module" ? 0 : 1) - (b.kind === "module" ? 0 : 1) ||
    a.text.length - b.text.length);
  return hits;
};

FX.results = (hits, query) => {
  if (!query.trim()) return "";
  const shown = hits.slice(0, 60).map((h) => `<li>${FX.link(h.item, h.text)} <small>${FX.esc(h.kind)}</small></li>`);
  return `<h3>Search <small>${hits.length} match${hits.length === 1 ? "" : "es"}</small></h3>` +
    (hits.length ? `<ul class="hits">${shown.join("")}</ul>` : `<p class="hint">No node or module matches.</p>`);
};

FX.details = (model, view, item) => {
  if (!item) return `<p class="hint">Click a module to expand it, a node to see its details.</p>`;
  return item.startsWith("n:") ? FX.nodeDetails(model, view, item.slice(2)) : FX.groupDetails(model, view, item);
};

FX.nodeDetails = (model, view, uid) => {
  const r = view.records.get(uid);
  if (!r) return `<p class="hint">${FX.esc(uid)} is not in this stage.</p>`;
  const status = view.status.get(uid);
  const stage = model.stages[view.stage];
  const users = [...stage.records.entries()].filter(([, u]) => u.inputs.includes(r.name)).map(([id]) => id);
  const parent = model.parent["n:" + uid];
  const colors = model.data.colors;
  const origin = r.origin ? `<span class="tag" style="background:${colors.adapters[FX.adapterKey(r.origin)]}">` +
    `${FX.esc(r.origin.adapter)} · ${FX.esc(r.origin.method)}</span> by pass <code>${FX.esc(r.origin.pass)}</code>` +
    (r.origin.site ? ` at ${FX.esc(r.origin.site)}, layer ${FX.esc(r.origin.layer)}` : "") : "";
  const merged = (r.merged || []).map((m) => `${FX.esc(m.adapter)} (${FX.esc(m.method)}) by <code>` +
    `${FX.esc(m.pass)}</code>`).join("<br>");
  const outputs = (r.shapes || []).map((s, i) => `${s ? "[" + s.join(", ") + "]" : "—"} ` +
    `<small>${FX.esc((r.dtypes || [])[i] || "")}</small>`).join("<br>");
  const nodeLinks = (ids) => ids.map((id) => FX.link("n:" + id, view.records.get(id)?.name || id)).join(", ");
  const inputs = r.inputs.map((name) => stage.uidOf.get(name) ?? model.stages[view.base ?? view.stage].uidOf.get(name))
    .filter((id) => id !== undefined);
  return `<h3>${FX.esc(r.name)} ${status ? `<span class="status ${status}">${status}</span>` : ""}</h3>` +
    `<table>` + FX.row("op", FX.esc(r.op)) + FX.row("target", `<code>${FX.esc(r.target)}</code>`) +
    FX.row("args", r.args ? `<code>${FX.esc(r.args)}</code>` : "") +
    FX.row("module", parent && parent !== FX.ROOT ? FX.link(parent, r.module || "(model)") : FX.esc(r.module || "(model)")) +
    FX.row("module type", FX.esc(r.module_type || "")) +
    FX.row("output", outputs) +
    FX.row("site", r.site ? `${FX.esc(r.site.role)}, layer ${FX.esc(r.site.layer)}` : "") +
    FX.row("created by", origin) + FX.row("merged", merged) +
    FX.row("inputs", nodeLinks(inputs)) + FX.row("users", nodeLinks(users)) + `</table>` + FX.params(r.params);
};

FX.params = (params) => {
  if (!params) return "";
  const rows = Object.entries(params).map(([name, p]) => `<tr><td>${FX.esc(name || "(tensor)")}</td>` +
    `<td>[${p.shape.join(", ")}]</td><td>${FX.esc(p.dtype)}</td><td class="num">${p.numel.toLocaleString("en")}</td></tr>`);
  const total = Object.values(params).reduce((s, p) => s + p.numel, 0);
  return `<h4>Parameters <small>${total.toLocaleString("en")}</small></h4><table class="params">` +
    `<tr><th>name</th><th>shape</th><th>dtype</th><th>numel</th></tr>${rows.join("")}</table>`;
};

FX.groupDetails = (model, view, gid) => {
  const group = model.groups[gid];
  const info = model.summary(view, gid);
  const count = (model.descendants[gid] || []).filter((uid) => view.records.has(uid)).length;
  const adapters = [...info.adapters.entries()].map(([key, n]) => `<span class="tag" style="background:` +
    `${model.data.colors.adapters[key]}">${FX.esc(key.replace("/", " · "))}</span> ${n} nodes`).join("<br>");
  const changes = Object.entries(info.changes).map(([k, n]) => `<span class="status ${k}">${k}</span> ${n}`).join(" ");
  const children = group.children.filter((c) => c.startsWith("g:")).map((c) => FX.link(c, model.groups[c].label));
  return `<h3>${FX.esc(group.path || "model")}</h3><table>` +
    FX.row("module type", FX.esc(group.type || "folded ops")) + FX.row("nodes", String(count)) +
    FX.row("adapters", adapters) + FX.row("changes", changes) + FX.row("sub-modules", children.join(", ")) +
    `</table>`;
};

FX.changes = (model, view) => {
  if (view.base === null) return "";
  const sections = [["inserted", "Inserted"], ["removed", "Removed"], ["merged", "Merged"]].map(([key, label]) => {
    const names = view.change[key];
    const stage = key === "removed" ? model.stages[view.base] : model.stages[view.stage];
    const links = names.slice(0, 200).map((name) => `<li>${FX.link("n:" + stage.uidOf.get(name), name)}</li>`);
    return `<h4><span class="status ${key}">${label}</span> ${names.length}</h4>` +
      (names.length ? `<ul class="hits">${links.join("")}</ul>` : "");
  });
  return `<h3>Changes</h3>${sections.join("")}`;
};
