"use strict";
// model.js: what one picture shows (a stage, optionally diffed against an earlier one, at some
// expansion) and where each box goes. Mirrors tools/view.py and tools/layout.py; ranks and orders
// inside every module were computed in Python, so this only sizes and places boxes.

const FX = {};

FX.ROOT = "g:";

FX.Model = class {
  constructor(data) {
    this.data = data;
    this.sizes = data.sizes;
    this.groups = data.groups;
    this.parent = data.parent;
    this.place = data.place;
    this.ancestors = {};  // item -> group ids from the root down to its parent
    this.ancestors[FX.ROOT] = [];
    for (const item of Object.keys(this.parent)) this.ancestors[item] = this._chain(item);
    this.stages = data.stages.map((stage) => {
      const records = new Map();
      const uidOf = new Map();
      for (const [uid, index] of stage.nodes) {
        const record = data.records[index];
        records.set(uid, record);
        uidOf.set(record.name, uid);
      }
      return {name: stage.stage, records, uidOf};
    });
    for (const stage of this.stages) stage.edges = this._edges(stage);
    this.descendants = {};  // group id -> uids of every node below it, in any stage
    for (const item of Object.keys(this.parent)) {
      if (!item.startsWith("n:")) continue;
      for (const gid of this.ancestors[item]) (this.descendants[gid] ||= []).push(item.slice(2));
    }
  }

  _chain(item) {
    const chain = [];
    while (item in this.parent) {
      item = this.parent[item];
      chain.push(item);
    }
    return chain.reverse();
  }

  _edges(stage) {
    const edges = [];
    for (const [uid, record] of stage.records) {
      for (const name of record.inputs) {
        const src = stage.uidOf.get(name);
        if (src !== undefined) edges.push([src, uid]);
      }
    }
    return edges;
  }

  /** The nodes of `stage`; with `base`, removed nodes and edges too, each with a status. */
  view(stage, base) {
    const now = this.stages[stage];
    const view = {stage, base, records: new Map(now.records), status: new Map(), edges: []};
    if (base === null || base === undefined || base === stage) {
      view.base = null;
      view.edges = now.edges.map(([a, b]) => [a, b, ""]);
      return view;
    }
    const before = this.stages[base];
    const change = this.data.diffs[`${base},${stage}`];
    for (const key of ["rewired", "merged", "inserted"]) {  // later keys win
      for (const name of change[key]) view.status.set(now.uidOf.get(name), key);
    }
    for (const name of change.removed) {
      const uid = before.uidOf.get(name);
      view.status.set(uid, "removed");
      view.records.set(uid, before.records.get(uid));
    }
    const key = ([a, b]) => a + "\u0000" + b;
    const oldEdges = new Set(before.edges.map(key));
    const newEdges = new Set(now.edges.map(key));
    view.edges = now.edges.map(([a, b]) => [a, b, oldEdges.has(key([a, b])) ? "" : "inserted"]);
    for (const edge of before.edges) if (!newEdges.has(key(edge))) view.edges.push([edge[0], edge[1], "removed"]);
    view.change = change;
    return view;
  }

  /** Drawn items (open modules' children) and the edges between them, deduplicated. */
  visible(view, expanded) {
    const rep = new Map();
    for (const uid of view.records.keys()) {
      const item = "n:" + uid;
      const closed = this.ancestors[item].find((g) => g !== FX.ROOT && !expanded.has(g));
      rep.set(uid, closed || item);
    }
    // Several edges can collapse onto one pair of boxes: the pair is new only if none of them existed
    // before, and gone only if none of them exists now (a rewired edge inside a module is neither).
    const pairs = new Map();
    for (const [a, b, kind] of view.edges) {
      const ra = rep.get(a), rb = rep.get(b);
      if (ra === undefined || rb === undefined || ra === rb) continue;
      const k = ra + "\u0000" + rb;
      if (!pairs.has(k)) pairs.set(k, [ra, rb, false, false]);
      const pair = pairs.get(k);
      if (kind !== "removed") pair[2] = true;  // exists now
      if (kind !== "inserted") pair[3] = true;  // existed before
    }
    const edges = [...pairs.values()].map(([a, b, now, before]) => [a, b, now && before ? "" : now ? "inserted" : "removed"]);
    return {rep, edges};
  }

  /** Boxes {x, y, w, h, kind} for every drawn item; the root frame sits at (0, 0). */
  layout(view, expanded) {
    const S = this.sizes;
    const live = new Set();
    for (const uid of view.records.keys()) {
      live.add("n:" + uid);
      for (const g of this.ancestors["n:" + uid]) live.add(g);
    }
    const isOpen = (item) => item === FX.ROOT || expanded.has(item);
    const sizes = new Map();
    const rowsOf = (gid) => {
      const rows = new Map();
      for (const child of this.groups[gid].children) {
        if (!live.has(child)) continue;
        const r = this.place[child][0];
        if (!rows.has(r)) rows.set(r, []);
        rows.get(r).push(child);
      }
      return [...rows.keys()].sort((a, b) => a - b)
        .map((r) => rows.get(r).sort((a, b) => this.place[a][1] - this.place[b][1]));
    };
    const size = (item) => {
      if (sizes.has(item)) return sizes.get(item);
      let dims;
      if (item.startsWith("n:")) dims = [S.node_w, S.node_h];
      else if (!isOpen(item)) dims = [S.group_w, S.group_h];
      else {
        const rows = rowsOf(item);
        let width = S.group_w, height = S.header + S.pad + S.gap_y * Math.max(rows.length - 1, 0);
        for (const row of rows) {
          const d = row.map(size);
          width = Math.max(width, d.reduce((s, x) => s + x[0], 0) + S.gap_x * (d.length - 1));
          height += Math.max(...d.map((x) => x[1]));
        }
        dims = [width + 2 * S.pad, height];
      }
      sizes.set(item, dims);
      return dims;
    };
    const boxes = new Map();
    const place = (item, x, y) => {
      const [w, h] = size(item);
      const kind = item.startsWith("n:") ? "node" : isOpen(item) ? "frame" : "group";
      boxes.set(item, {x, y, w, h, kind});
      if (kind !== "frame") return;
      let top = y + S.header;
      for (const row of rowsOf(item)) {
        const rowW = row.reduce((s, c) => s + size(c)[0], 0) + S.gap_x * (row.length - 1);
        let cx = x + (w - rowW) / 2;
        for (const child of row) {
          place(child, cx, top);
          cx += size(child)[0] + S.gap_x;
        }
        top += Math.max(...row.map((c) => size(c)[1])) + S.gap_y;
      }
    };
    place(FX.ROOT, 0, 0);
    return boxes;
  }

  /** Adapters acting (key -> nodes created or merged into) and diff statuses (-> count) inside a module, in this view. */
  summary(view, gid) {
    const adapters = new Map();
    const changes = {};
    for (const uid of this.descendants[gid] || []) {
      const record = view.records.get(uid);
      if (!record) continue;
      for (const key of FX.adapterKeys(record)) adapters.set(key, (adapters.get(key) || 0) + 1);
      const status = view.status.get(uid);
      if (status) changes[status] = (changes[status] || 0) + 1;
    }
    return {adapters, changes};
  }
};

FX.adapterKey = (origin) => `${origin.adapter}/${origin.method}`;

/** The adapters acting at a node: the one that created it, and those merged into its weights. */
FX.adapterKeys = (record) => (record.origin ? [FX.adapterKey(record.origin)] : [])
  .concat((record.merged || []).map(FX.adapterKey));

FX.shapeText = (record) => {
  if (record.op === "get_attr" && record.params) {
    const first = Object.values(record.params)[0];
    return `[${first.shape.join(", ")}]`;
  }
  const shape = (record.shapes || [])[0];
  return shape ? `[${shape.join(", ")}]` : "";
};
