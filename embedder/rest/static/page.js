// embedder's web page: plain JavaScript over the HTTP API (/v1), no build step, no third-party requests.
// The token lives in sessionStorage only; every call carries it. Text from the server is set as text, never as HTML.
"use strict";

const TOKEN_KEY = "embedder.token";
const UPLOAD_FILES = 16;  // files per add request: progress moves often, and one bad request fails few files
const THUMB_WORKERS = 6;  // thumbnails fetched at once
const THUMB_SIDE = 256;   // pixels: sharp in a tile on a high-density screen, a few kB instead of the whole photo

const state = {
  collections: [],
  current: "",         // the chosen collection's name
  info: null,          // its counts, model and labels (from /v1/stats)
  offset: 0,
  filter: "all",       // "all", "unlabelled", "label:<name>" or "hits"
  hits: [],            // the last search's hits, shown by the "hits" filter
  hitsOf: "",
  selected: new Set(),
  shown: [],           // ids in the grid, in order
  anchor: null,        // the last clicked tile, for shift-click ranges
  suggestions: [],
  view: 0,             // +1 per grid load: an older load still waiting for the server must not draw over it
  limits: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

// ------------------------------------------------------------------ calls

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function collectionPath(name, rest = "") {
  return `/collections/${encodeURIComponent(name)}${rest}`;
}

async function call(method, path, body) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(`/v1${path}`, { method, headers, body: payload });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not our JSON: keep the status */ }
    throw new ApiError(response.status, message);
  }
  return response.headers.get("content-type")?.startsWith("application/json") ? response.json() : response.blob();
}

function showError(error) {
  const text = error instanceof ApiError && error.status === 401
    ? (token() ? `The server refused the token: ${error.message}` : "Sign in: enter the server's token or an API key above.")
    : error.message || String(error);
  $("banner-text").textContent = text;
  $("banner").hidden = false;
}

// Run an action from a click or key; its failure goes to the banner.
function act(fn) {
  return async (...args) => {
    try { await fn(...args); } catch (e) { showError(e); }
  };
}

// ------------------------------------------------------------------ thumbnails

const thumbUrls = new Map();  // element -> the blob URLs of its thumbnails, revoked when it is redrawn

function revokeThumbs(root) {
  for (const url of thumbUrls.get(root) || []) URL.revokeObjectURL(url);
  thumbUrls.set(root, []);
}

// Fill <img data-id> elements in `root` with their kept images, THUMB_WORKERS at a time.
async function loadThumbs(root) {
  const queue = [...root.querySelectorAll("img[data-id]")];
  const collection = state.info.name;
  async function worker() {
    for (let img = queue.shift(); img; img = queue.shift()) {
      if (!img.isConnected) continue;  // its view was replaced meanwhile
      try {
        const query = new URLSearchParams({ id: img.dataset.id, size: THUMB_SIDE });
        const blob = await call("GET", collectionPath(collection, `/image?${query}`));
        const url = URL.createObjectURL(blob);
        thumbUrls.get(root)?.push(url);
        img.src = url;
      } catch (e) {
        img.replaceWith(el("div", { class: "placeholder" }, "image not kept"));
      }
    }
  }
  await Promise.all(Array.from({ length: THUMB_WORKERS }, worker));
}

function tile(id, label, { kept = true, score = null, onclick = null } = {}) {
  const picture = kept ? el("img", { "data-id": id, alt: id }) : el("div", { class: "placeholder" }, "no image kept");
  const caption = el("figcaption", { title: id },
    label ? el("span", { class: "label" }, label) : el("span", { class: "nolabel" }, "unlabelled"),
    score === null ? "" : ` ${score.toFixed(3)}`, " · ", id);
  const similar = el("button", { class: "similar", type: "button", title: "find similar images" }, "≈");
  similar.addEventListener("click", act(async (event) => { event.stopPropagation(); await searchBy(id); }));
  const node = el("figure", { class: "tile", "data-id": id }, picture, caption, similar);
  if (onclick) node.addEventListener("click", onclick);
  return node;
}

// ------------------------------------------------------------------ collections

async function loadCollections() {
  const stats = await call("GET", "/stats");
  state.collections = stats.collections;
  $("signed").textContent = `${token() ? "Signed in · " : ""}${count(stats.collections.length, "collection")}, ` +
    `${count(stats.items, "item")}, ${count(stats.heads, "head")}`;
  const list = $("collections");
  list.replaceChildren(...stats.collections.map((c) => {
    const labels = Object.entries(c.labels).map(([l, n]) => `${l} ${n}`).join(", ");
    return el("li", { "data-name": c.name,
                      onclick: act(() => choose(c.name)) },
      el("strong", {}, c.name), el("div", { class: "meta" },
        `${c.count} items · ${c.unlabeled} unlabelled`, el("br"), labels || "no labels", el("br"),
        `${c.model_id.split(":")[0]} · ${c.index}`));
  }));
  state.info = stats.collections.find((c) => c.name === state.current) || stats.collections[0] || null;
  state.current = state.info?.name || "";
  renderCollection();
}

async function choose(name) {
  state.current = name;
  state.offset = 0;
  state.filter = "all";
  state.selected.clear();
  state.suggestions = [];
  for (const root of thumbUrls.keys()) revokeThumbs(root);
  $("next-current").replaceChildren();
  $("issues").replaceChildren();
  $("try-hits").replaceChildren();
  $("train-result").replaceChildren();
  await loadCollections();
  await loadItems();
}

function classes() {
  return state.info ? Object.keys(state.info.labels).sort() : [];
}

function renderCollection() {
  for (const li of $("collections").children) li.classList.toggle("current", li.dataset.name === state.info?.name);
  $("title").textContent = state.info ? `${state.info.name} — ${state.info.count} items` :
    "Create a collection (left), then add images";
  const filter = $("filter");
  const options = [["all", "all items"], ["unlabelled", "unlabelled"],
    ...classes().map((c) => [`label:${c}`, `label: ${c}`]), ["hits", state.hitsOf ? `search hits (${state.hitsOf})` : "search hits"]];
  filter.replaceChildren(...options.map(([v, text]) => el("option", { value: v }, text)));
  filter.value = state.filter;
  $("label-list").replaceChildren(...classes().map((c) => el("option", { value: c })));
  $("classes").replaceChildren(...classes().slice(0, 9).map((c, i) =>
    el("button", { type: "button", title: `label the selection ${c} (key ${i + 1})`,
                   onclick: act(() => labelSelection(c)) }, el("kbd", {}, `${i + 1}`), " ", c)));
}

// ------------------------------------------------------------------ the grid

function pageSize() { return Number($("page-size").value); }

async function loadItems() {
  const view = ++state.view;
  const grid = $("grid");
  if (!state.info) { grid.replaceChildren(); $("range").textContent = ""; return; }
  let rows, total;
  if (state.filter === "hits") {
    rows = state.hits.map((h) => ({ id: h.id, label: h.label, image: true, score: h.score }));
    total = rows.length;
    state.offset = 0;
  } else {
    const q = new URLSearchParams({ offset: state.offset, limit: pageSize() });
    if (state.filter === "unlabelled") q.set("unlabelled", "true");
    if (state.filter.startsWith("label:")) q.set("label", state.filter.slice(6));
    if ($("where").value.trim()) q.set("where", $("where").value.trim());
    const page = await call("GET", collectionPath(state.info.name, `/items?${q}`));
    if (view !== state.view) return;
    if (!page.items.length && page.total && state.offset >= page.total) {  // the last page emptied: step back
      state.offset = Math.max(0, Math.floor((page.total - 1) / pageSize()) * pageSize());
      return loadItems();
    }
    rows = page.items;
    total = page.total;
  }
  revokeThumbs(grid);
  state.shown = rows.map((r) => r.id);
  $("range").textContent = total ? `${state.offset + 1}–${state.offset + rows.length} of ${total}` : "no items";
  const pages = state.filter === "hits" ? 1 : Math.max(1, Math.ceil(total / pageSize()));
  $("page-no").max = pages;
  $("page-no").value = Math.floor(state.offset / pageSize()) + 1;
  $("pages").textContent = ` of ${pages}`;
  $("prev").disabled = state.filter === "hits" || state.offset === 0;
  $("next").disabled = state.filter === "hits" || state.offset + rows.length >= total;
  grid.replaceChildren(...rows.map((r) => {
    const node = tile(r.id, r.label, { kept: r.image, score: r.score ?? null, onclick: (e) => toggle(r.id, e.shiftKey) });
    node.classList.toggle("selected", state.selected.has(r.id));
    return node;
  }));
  renderSelection();
  await loadThumbs(grid);
}

function toggle(id, range) {
  if (range && state.anchor !== null) {
    const [a, b] = [state.shown.indexOf(state.anchor), state.shown.indexOf(id)].sort((x, y) => x - y);
    if (a >= 0) state.shown.slice(a, b + 1).forEach((i) => state.selected.add(i));
  } else if (state.selected.has(id)) state.selected.delete(id);
  else state.selected.add(id);
  state.anchor = id;
  redrawSelection();
}

function redrawSelection() {
  for (const node of $("grid").children) node.classList.toggle("selected", state.selected.has(node.dataset.id));
  renderSelection();
}

function renderSelection() {
  const n = state.selected.size;
  $("selection").textContent = n ? `${n} selected` : "nothing selected (click images; shift-click a range)";
}

async function setLabels(ids, label) {
  const body = label === null ? { clear: ids } : { labels: Object.fromEntries(ids.map((i) => [i, label])) };
  await call("POST", collectionPath(state.info.name, "/labels"), body);
}

async function labelSelection(label) {
  if (!state.selected.size) throw new Error("Select images first (click them), then choose a label.");
  await setLabels([...state.selected], label);
  for (const h of state.hits) if (state.selected.has(h.id)) h.label = label;  // the hits view shows them again
  state.selected.clear();
  await loadCollections();
  await loadItems();
}

async function searchBy(id) {
  const found = await call("POST", "/search", { collection: state.info.name, item_id: id, k: 24 });
  state.hits = found.hits;
  state.hitsOf = id;
  state.filter = "hits";
  showTab("items");
  renderCollection();
  await loadItems();
}

// ------------------------------------------------------------------ adding images

async function addFiles(files) {
  if (!state.info) throw new Error("Create or choose a collection first.");
  const label = $("add-label").value.trim();
  const limit = (state.limits?.max_message_bytes || 64 << 20) / 2;
  const progress = $("add-progress");
  const errors = $("add-errors");
  errors.replaceChildren();
  progress.max = files.length;
  progress.value = 0;
  let added = 0, failed = 0;
  const status = () => { $("add-status").textContent = `${added} added, ${failed} failed, of ${files.length} files`; };
  status();
  for (let start = 0; start < files.length;) {
    const batch = [];
    let bytes = 0;
    while (start < files.length && batch.length < UPLOAD_FILES && (!batch.length || bytes + files[start].size < limit)) {
      bytes += files[start].size;
      batch.push(files[start++]);
    }
    const form = new FormData();
    for (const f of batch) form.append("image", f, f.webkitRelativePath || f.name);
    if (label) form.append("label", label);
    try {
      const out = await call("POST", collectionPath(state.info.name, "/add"), form);
      for (const r of out.results) {
        if (r.error) { failed++; errors.append(el("li", {}, `${r.id}: ${r.error.message}`)); } else added++;
      }
    } catch (e) {
      failed += batch.length;
      for (const f of batch) errors.append(el("li", {}, `${f.webkitRelativePath || f.name}: ${e.message}`));
    }
    progress.value = start;
    status();
  }
  await loadCollections();
  await loadItems();
}

// Files of a drop, folders walked (webkitGetAsEntry), each file named by its path in the folder.
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...transfer.files];
  const out = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((ok, bad) => entry.file(ok, bad));
      out.push(prefix ? new File([file], prefix + file.name, { type: file.type }) : file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (let batch = await new Promise((ok, bad) => reader.readEntries(ok, bad)); batch.length;
        batch = await new Promise((ok, bad) => reader.readEntries(ok, bad))) {
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  }
  for (const entry of entries) await walk(entry, "");
  return out;
}

function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", act(async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    await onFiles(await droppedFiles(e.dataTransfer));
  }));
}

// ------------------------------------------------------------------ training

function table(head, rows, attrs = {}) {
  return el("table", attrs, el("tr", {}, ...head.map((h) => el("th", {}, h))),
    ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))))));
}

function count(n, noun) { return `${n} ${noun}${n === 1 ? "" : "s"}`; }

function pct(x) { return `${(100 * x).toFixed(1)}%`; }

async function train(event) {
  event.preventDefault();
  let params;
  try { params = JSON.parse($("head-params").value || "{}"); } catch (e) {
    throw new Error(`Parameters must be a JSON object, e.g. {"C": 1.0}: ${e.message}`);
  }
  const kind = $("head-kind").value;
  const out = $("train-result");
  out.replaceChildren(el("p", {}, "Training…"));
  $("train").disabled = true;
  try {
    const result = await call("POST", collectionPath(state.info.name, "/train"),
      { head: kind, params, test_size: Number($("test-size").value) });
    out.replaceChildren(...metrics(result));
  } finally { $("train").disabled = false; }
  await loadCollections();  // the head count
  const curve = el("div", {}, el("p", {}, "Learning curve…"));
  out.append(curve);
  try {
    const points = (await call("POST", collectionPath(state.info.name, "/learning-curve"), { head: kind, params })).points;
    curve.replaceChildren(el("h3", {}, "Learning curve (hold-out accuracy by labels per class)"), curveSvg(points));
  } catch (e) {
    curve.replaceChildren(el("p", { class: "errors" }, `No learning curve: ${e.message}`));
  }
}

function metrics(result) {
  const h = result.head, m = h.metrics || {};
  const parts = [el("p", { class: "summary" }, `Head ${h.head_id} (${h.kind}) on ${result.samples} labelled items, `,
    `trained in ${result.train_seconds.toFixed(2)} s. `)];
  if (m.accuracy === undefined) {
    parts.push(el("p", {}, `No hold-out metrics: ${m.reason || "too few labelled items"}`));
    return parts;
  }
  parts[0].append(el("strong", { id: "accuracy" }, `Accuracy ${pct(m.accuracy)}`),
    `, macro-F1 ${pct(m.macro_f1)} on ${m.n_evaluated} held-out items.`);
  const names = m.classes.map(String);
  const perClass = table(["class", "precision", "recall", "F1", "support"], names.map((c) => {
    const r = m.per_class[c];
    return [c, pct(r.precision), pct(r.recall), pct(r.f1), r.support];
  }), { id: "per-class" });
  const most = Math.max(1, ...m.confusion.flat());
  const confusion = table(["true \\ predicted", ...names], m.confusion.map((row, i) => [names[i], ...row.map((n, j) => {
    const cell = el("td", {}, n);
    const shade = Math.round(255 - 150 * (n / most));
    cell.style.background = i === j ? `rgb(${shade},255,${shade})` : n ? `rgb(255,${shade},${shade})` : "";
    return cell;
  })]), { class: "confusion", id: "confusion" });
  parts.push(el("div", { class: "figures" }, el("div", {}, el("h3", {}, "Per class"), perClass),
    el("div", {}, el("h3", {}, "Confusion matrix"), confusion)));
  return parts;
}

function curveSvg(points) {
  const ns = "http://www.w3.org/2000/svg";
  const W = 420, H = 220, L = 40, B = 30, T = 10, R = 10;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("class", "curve");
  svg.id = "curve";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  const xs = points.map((p) => p.per_class), maxX = Math.max(...xs), minX = Math.min(...xs);
  const x = (v) => L + (maxX === minX ? 0.5 : (v - minX) / (maxX - minX)) * (W - L - R);
  const y = (v) => T + (1 - v) * (H - T - B);
  add("line", { x1: L, y1: y(0), x2: W - R, y2: y(0), stroke: "#999" });
  add("line", { x1: L, y1: T, x2: L, y2: y(0), stroke: "#999" });
  for (const v of [0, 0.5, 1]) add("text", { x: 4, y: y(v) + 4 }, pct(v).replace(".0", ""));
  const band = points.map((p) => `${x(p.per_class)},${y(p.ci_high)}`).concat(
    [...points].reverse().map((p) => `${x(p.per_class)},${y(p.ci_low)}`)).join(" ");
  add("polygon", { points: band, fill: "#c9d8f6" });
  add("polyline", { points: points.map((p) => `${x(p.per_class)},${y(p.accuracy_mean)}`).join(" "),
    fill: "none", stroke: "#2459c9", "stroke-width": 2 });
  for (const p of points) {
    add("circle", { cx: x(p.per_class), cy: y(p.accuracy_mean), r: 3, fill: "#2459c9" });
    add("text", { x: x(p.per_class) - 4, y: H - 10 }, p.per_class);
  }
  return svg;
}

// ------------------------------------------------------------------ try it

async function tryImage(files) {
  const file = files[0];
  if (!file) return;
  if (!state.info) throw new Error("Choose a collection first.");
  const preview = $("try-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const heads = (await call("GET", "/heads")).heads.filter((h) => h.collection === state.info.name);
  const out = $("try-heads");
  if (heads.length) {
    const form = new FormData();
    for (const h of heads) form.append("head_ids", h.head_id);
    form.append("top_k", "3");
    form.append("image", file, file.name);
    const row = (await call("POST", "/predict", form)).predictions[0];
    if (row.error) throw new Error(`${file.name}: ${row.error.message}`);
    out.replaceChildren(...heads.map((h) => el("div", { class: "prediction" },
      el("h3", {}, `${h.head_id} (${h.kind})`),
      ...row.heads[h.head_id].map((s) => el("div", {},
        bar(s.probability), el("strong", {}, s.label), ` ${pct(s.probability)}`)))));
  } else {
    out.replaceChildren(el("p", {}, "No head trained on this collection yet: train one to see predictions."));
  }
  const form = new FormData();
  form.append("collection", state.info.name);
  form.append("k", "12");
  form.append("image", file, file.name);
  const hits = (await call("POST", "/search", form)).hits;
  const grid = $("try-hits");
  revokeThumbs(grid);
  grid.replaceChildren(...hits.map((h) => tile(h.id, h.label, { score: h.score, onclick: act(() => searchBy(h.id)) })));
  await loadThumbs(grid);
}

function bar(fraction) {
  const node = el("span", { class: "bar" });
  node.style.width = `${Math.round(100 * fraction)}px`;  // through the CSSOM: the page's CSP refuses style="..."
  return node;
}

// ------------------------------------------------------------------ label next

async function suggest() {
  const out = await call("POST", collectionPath(state.info.name, "/suggest"), { n: 20 });
  state.suggestions = out.suggestions;
  $("next-status").textContent = `${out.suggestions.length} suggestions (${out.strategy}) from ${out.candidates} unlabelled items`;
  await showSuggestion();
}

async function showSuggestion() {
  const box = $("next-current");
  const s = state.suggestions[0];
  if (!s) {
    box.replaceChildren(el("p", {}, "No suggestions left: get more, or train a head."));
    return;
  }
  const picture = tile(s.id, null);
  revokeThumbs(box);
  box.replaceChildren(el("div", { class: "suggestion" }, picture, el("div", {},
    el("p", {}, el("strong", {}, s.id), ` — ${s.reason} (score ${s.score.toFixed(3)})`),
    el("p", {}, "Label it:"),
    el("div", { class: "classes" }, ...classes().slice(0, 9).map((c, i) =>
      el("button", { type: "button", title: `key ${i + 1}`, onclick: act(() => labelSuggestion(c)) },
        el("kbd", {}, `${i + 1}`), " ", c)),
      el("button", { type: "button", title: "key s", onclick: act(skipSuggestion) }, el("kbd", {}, "s"), " skip")),
    el("form", { class: "toolbar", onsubmit: act(async (e) => {
      e.preventDefault();
      const label = e.target.elements.label.value.trim();
      if (label) await labelSuggestion(label);
    }) }, el("input", { name: "label", list: "label-list", placeholder: "or a new label", maxlength: "256" }),
    el("button", {}, "Label")),
    el("p", { class: "hint" }, `${state.suggestions.length} left in this batch`))));
  await loadThumbs(box);
}

async function labelSuggestion(label) {
  const s = state.suggestions.shift();
  if (!s) return;
  await setLabels([s.id], label);
  $("next-status").textContent = `labelled ${s.id} as ${label}`;
  await loadCollections();
  await showSuggestion();
}

async function skipSuggestion() {
  state.suggestions.shift();
  await showSuggestion();
}

// ------------------------------------------------------------------ check labels

async function checkLabels() {
  $("issues-status").textContent = "Checking…";
  const out = await call("POST", collectionPath(state.info.name, "/label-issues"), {});
  const rows = [...out.issues, ...out.duplicates];
  $("issues-status").textContent = `${rows.length} flagged of ${out.checked} labelled items`;
  const fix = (issue, cell) => act(async () => {
    await setLabels([issue.id], issue.suggested);
    cell.replaceChildren(el("span", { class: "done" }, `relabelled ${issue.suggested}`));
    await loadCollections();
  });
  revokeThumbs($("issues"));
  $("issues").replaceChildren(table(["image", "item", "label", "suggested", "score", "why", ""], rows.map((issue) => {
    const cell = el("td", {});
    cell.append(el("button", { type: "button", class: "fix", onclick: fix(issue, cell) }, `Relabel as ${issue.suggested}`));
    return [el("td", {}, el("img", { "data-id": issue.id, alt: issue.id })), issue.id, issue.label, issue.suggested,
      issue.score.toFixed(3), issue.other ? `${issue.kind} of ${issue.other}` : issue.kind, cell];
  })));
  await loadThumbs($("issues"));
}

// ------------------------------------------------------------------ page, tabs, keys

function showTab(name) {
  for (const b of $("tabs").children) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== `tab-${name}`;
}

function currentTab() { return document.querySelector("#tabs .active").dataset.tab; }

async function page(step) {
  const next = state.offset + step * pageSize();
  if (state.filter === "hits" || next < 0) return;
  state.offset = next;
  await loadItems();
}

const onKey = act(async (e) => {
  if (e.target.closest("input, textarea, select") || e.ctrlKey || e.metaKey || e.altKey || !state.info) return;
  const tab = currentTab();
  if (/^[1-9]$/.test(e.key)) {
    const label = classes()[Number(e.key) - 1];
    if (!label) return;
    if (tab === "next") await labelSuggestion(label);
    else if (tab === "items") await labelSelection(label);
  } else if (e.key === "0" && tab === "items" && state.selected.size) await labelSelection(null);
  else if (e.key === "s" && tab === "next") await skipSuggestion();
  else if (e.key === "a" && tab === "items") { state.shown.forEach((i) => state.selected.add(i)); redrawSelection(); }
  else if (e.key === "Escape") { state.selected.clear(); redrawSelection(); }
  else if (e.key === "ArrowLeft" && tab === "items") await page(-1);
  else if (e.key === "ArrowRight" && tab === "items") await page(1);
});

async function start() {
  $("banner").hidden = true;
  try {
    state.limits = (await call("GET", "/models")).limits;
    await loadCollections();
    await loadItems();
  } catch (e) {
    showError(e);
    if (e instanceof ApiError && e.status === 401) sessionStorage.removeItem(TOKEN_KEY);  // a refused token is not kept
  }
}

function init() {
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("sign-out").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
  $("banner-close").addEventListener("click", () => { $("banner").hidden = true; });
  $("tabs").addEventListener("click", (e) => { if (e.target.dataset.tab) showTab(e.target.dataset.tab); });
  $("create").addEventListener("submit", act(async (e) => {
    e.preventDefault();
    const name = $("new-name").value.trim();
    await call("PUT", collectionPath(name), { index: $("new-index").value });
    $("new-name").value = "";
    await choose(name);
  }));
  $("filter").addEventListener("change", act(async () => {
    state.filter = $("filter").value;
    state.offset = 0;
    if (state.filter === "hits" && !state.hits.length) showError(new Error("No search yet: press ≈ on an image."));
    await loadItems();
  }));
  $("page-size").addEventListener("change", act(async () => { state.offset = 0; await loadItems(); }));
  $("where").addEventListener("change", act(async () => { state.offset = 0; await loadItems(); }));
  $("page-no").addEventListener("change", act(async () => {
    const n = Math.min(Math.max(1, Math.floor(Number($("page-no").value)) || 1), Number($("page-no").max) || 1);
    if (state.filter === "hits") return;
    state.offset = (n - 1) * pageSize();
    await loadItems();
  }));
  $("prev").addEventListener("click", act(() => page(-1)));
  $("next").addEventListener("click", act(() => page(1)));
  $("set-label").addEventListener("click", act(async () => {
    const label = $("label-input").value.trim();
    if (!label) throw new Error("Type a label to set (or pick one of the class buttons).");
    await labelSelection(label);
    $("label-input").value = "";
  }));
  $("clear-label").addEventListener("click", act(() => labelSelection(null)));
  const files = act(async (e) => { await addFiles([...e.target.files]); e.target.value = ""; });
  $("files").addEventListener("change", files);
  $("folder").addEventListener("change", files);
  dropZone($("drop"), addFiles);
  dropZone($("try-drop"), tryImage);
  $("try-file").addEventListener("change", act(async (e) => { await tryImage([...e.target.files]); e.target.value = ""; }));
  $("train-form").addEventListener("submit", act(train));
  $("suggest").addEventListener("click", act(suggest));
  $("check").addEventListener("click", act(checkLabels));
  document.addEventListener("keydown", onKey);
  start();
}

init();
