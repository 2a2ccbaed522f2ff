// SAE feature dashboard: an index of latents and a page per latent, drawn from the data files beside
// this one (data/index.js, data/latents-NNNN.js, each JSON wrapped in one SAE_DASHBOARD call).
// Plain DOM and SVG, no libraries, no network; data text only ever enters the page as textContent.
"use strict";
(function () {
  const state = {
    index: null,             // {meta, columns, latents: [row objects]}
    byId: new Map(),         // latent id -> index row
    shards: new Map(),       // data file number -> {vocab, latents: Map(id -> entry)}
    requested: new Set(),
    sort: { key: "density", asc: false },
    query: "",
    shown: 200,
  };
  const PAGE = 200;

  // ---- small helpers --------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children.flat(Infinity)) {
      if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function num(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1000 || a < 0.001 ? v.toExponential(2) : v.toPrecision(3);
  }
  function percent(d) {
    const p = 100 * d;
    return p === 0 ? "0%" : (p >= 1 ? p.toPrecision(3) : p >= 0.001 ? p.toPrecision(2) : p.toExponential(1)) + "%";
  }
  function show(...nodes) {
    document.getElementById("app").replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined));
  }
  function shown(text) {
    return text.replace(/\n/g, "\u23CE");   // keep every context on one line
  }

  // ---- data arrival ---------------------------------------------------------------------------
  window.SAE_DASHBOARD = {
    index(data) {
      const cols = data.columns;
      const rows = data.latents.map((r) => Object.fromEntries(cols.map((c, j) => [c, r[j]])));
      state.index = { meta: data.meta, latents: rows };
      rows.forEach((r) => state.byId.set(r.latent, r));
      const m = data.meta;
      document.getElementById("summary").textContent =
        `${m.architecture}, ${m.n_total} latents` + (m.model ? ` · ${m.model}` : "") + ` · ${m.hook} · ${m.rows.toLocaleString()} tokens`;
      route();
    },
    shard(n, data) {
      state.shards.set(n, { vocab: data.vocab, latents: new Map(data.latents.map((e) => [e.i, e])) });
      route();
    },
    missing(file) {
      show(el("p", { class: "error" }, `The data file ${file} is missing: rebuild the dashboard.`));
    },
  };
  window.addEventListener("hashchange", route);
  document.getElementById("jump").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = document.getElementById("jump-to").value;
    if (v !== "") location.hash = `latent=${v}`;
  });

  function route() {
    if (!state.index) return;
    const m = location.hash.match(/^#latent=(-?\d+)/);
    if (m) showLatent(Number(m[1]));
    else showIndex();
  }

  // ---- the index ------------------------------------------------------------------------------
  function showIndex() {
    const m = state.index.meta;
    const dead = state.index.latents.filter((r) => r.count === 0).length;
    const search = el("input", { type: "search", id: "search", placeholder: "search by token, e.g. red",
                                 value: state.query });
    search.addEventListener("input", () => { state.query = search.value; state.shown = PAGE; drawTable(); });
    show(
      el("h2", {}, "Latents"),
      el("p", { class: "note" }, `${m.tracked} of ${m.n_total} latents, from ${m.rows.toLocaleString()} tokens of ${m.data}. ` +
        `${dead} never fired in these tokens. Dictionary: ${m.dictionary}.` + metricsLine(m.metrics)),
      el("div", { class: "cols" }, el("div", {}, el("h3", {}, "Feature density (log10 of the share of tokens a latent fires on)"),
                                       densityPlot(state.index.latents, m.rows))),
      el("div", { class: "toolbar" }, search, el("span", { id: "count", class: "note" })),
      el("div", { id: "table" }));
    drawTable();
  }

  function metricsLine(metrics) {
    const parts = Object.entries(metrics || {}).map(([k, v]) => `${k} ${Number.isInteger(v) ? v.toLocaleString() : num(v)}`);
    return parts.length ? ` End-of-run metrics: ${parts.join(", ")}.` : "";
  }

  function matches(r, q) {
    if (!q) return true;
    return r.peak_tokens.concat(r.promoted_tokens).some((t) => t.toLowerCase().includes(q));
  }

  function drawTable() {
    const q = state.query.trim().toLowerCase();
    const { key, asc } = state.sort;
    const rows = state.index.latents.filter((r) => matches(r, q));
    rows.sort((a, b) => (asc ? 1 : -1) * (a[key] - b[key]) || a.latent - b.latent);
    document.getElementById("count").textContent =
      q ? `${rows.length} latents with a token matching "${state.query.trim()}"` : `${rows.length} latents`;
    const head = el("tr", {}, ...[["latent", "latent"], ["density", "density"], ["count", null], ["max", "max activation"],
                                  ["mean", "mean when firing"]].map(([k, label]) => header(k, label || k)),
                    el("th", {}, "top tokens"), el("th", {}, "promotes"));
    const body = rows.slice(0, state.shown).map((r) => el("tr", { class: "row", "data-latent": r.latent,
                                                                  onclick: () => { location.hash = `latent=${r.latent}`; } },
      el("td", { class: "num" }, el("a", { href: `#latent=${r.latent}` }, `#${r.latent}`)),
      el("td", { class: "num" }, percent(r.density)), el("td", { class: "num" }, r.count.toLocaleString()),
      el("td", { class: "num" }, num(r.max)), el("td", { class: "num" }, num(r.mean)),
      el("td", {}, r.peak_tokens.map((t) => el("span", { class: "chip" }, shown(t)))),
      el("td", {}, r.promoted_tokens.map((t) => el("span", { class: "chip up" }, shown(t))))));
    const more = rows.length > state.shown
      ? el("button", { id: "more", onclick: () => { state.shown += PAGE; drawTable(); } }, `show ${Math.min(PAGE, rows.length - state.shown)} more`)
      : null;
    document.getElementById("table").replaceChildren(el("table", { id: "latents" }, el("thead", {}, head), el("tbody", {}, body)), more);
  }

  function header(key, label) {
    if (!["latent", "density", "max", "mean"].includes(key)) return el("th", { class: "num" }, label);
    const active = state.sort.key === key;
    const th = el("th", { class: `num sortable${active ? " active" : ""}${active && state.sort.asc ? " asc" : ""}`,
                          "data-sort": key, title: "sort" }, label);
    th.addEventListener("click", () => {
      state.sort = { key, asc: active ? !state.sort.asc : key === "latent" };
      drawTable();
    });
    return th;
  }

  function densityPlot(rows, nRows) {
    const logs = rows.filter((r) => r.count > 0).map((r) => Math.log10(r.density));
    if (!logs.length) return el("p", { class: "note" }, "No latent fired.");
    const lo = Math.min(Math.floor(Math.min(...logs) * 2) / 2, Math.log10(1 / nRows)), hi = 0, nb = 40;
    const counts = new Array(nb).fill(0);
    logs.forEach((v) => { counts[Math.min(nb - 1, Math.floor(((v - lo) / (hi - lo)) * nb))] += 1; });
    return barChart(counts, lo, hi, "dens", (a) => `10^${a.toFixed(1)}`, null);
  }

  // ---- one latent -----------------------------------------------------------------------------
  function showLatent(id) {
    const row = state.byId.get(id);
    if (!row) {
      const m = state.index.meta;
      show(el("p", { class: "error" }, `Latent ${id} is not in this dashboard: it has pages for ${m.tracked} of the ` +
                                       `dictionary's ${m.n_total} latents (0 to ${m.n_total - 1}).`),
           el("p", {}, el("a", { href: "#" }, "back to the index")));
      return;
    }
    const shard = state.shards.get(row.shard);
    if (!shard) {
      requestShard(row.shard);
      show(el("p", { class: "note" }, `Loading latent ${id}\u2026`));
      return;
    }
    drawLatent(shard.latents.get(id), shard.vocab);
  }

  function requestShard(n) {
    if (state.requested.has(n)) return;
    state.requested.add(n);
    const file = `data/latents-${String(n).padStart(4, "0")}.js`;
    document.body.append(el("script", { src: file, onerror: () => SAE_DASHBOARD.missing(file) }));
  }

  function drawLatent(e, vocab) {
    const m = state.index.meta;
    const ids = state.index.latents.map((r) => r.latent);
    const at = ids.indexOf(e.i);
    const nav = el("nav", { class: "pager" },
      at > 0 ? el("a", { href: `#latent=${ids[at - 1]}` }, `\u2190 #${ids[at - 1]}`) : null,
      el("a", { href: "#" }, "index"),
      at < ids.length - 1 ? el("a", { href: `#latent=${ids[at + 1]}` }, `#${ids[at + 1]} \u2192`) : null);
    const sub = e.binding ? ` \u00B7 atom ${e.binding.atom}, slot ${e.binding.slot + 1}` : "";
    show(nav, el("h2", { id: "title" }, `Latent ${e.i}${sub}`),
      el("div", { class: "stats" },
        stat(percent(e.density), `density: fires on ${e.count.toLocaleString()} of ${m.rows.toLocaleString()} tokens`),
        stat(num(e.max), "max activation"), stat(num(e.mean), "mean when firing")),
      el("div", { class: "cols" },
        el("div", { id: "histogram" }, el("h3", {}, "Activation histogram (tokens it fires on)"), histogram(e)),
        el("div", { id: "near" }, el("h3", {}, "Nearest latents by decoder cosine"), neighbours(e))),
      e.binding ? el("div", { id: "binding" }, el("h3", {}, "The atom in every slot"), binding(e.binding)) : null,
      el("div", { id: "top" }, el("h3", {}, `Top activations (${e.top.length})`),
        e.top.length ? e.top.map((c) => context(c, vocab, e.max)) : el("p", { class: "note" }, "It never fired.")),
      el("div", { id: "samples" }, el("h3", {}, "Random tokens it fires on, by activation percentile"), samples(e, vocab)),
      el("div", { id: "logits" }, el("h3", {}, "Output tokens (decoder row through the unembedding, direct path)"),
        outputTokens(e, vocab)));
  }

  function stat(value, label) {
    return el("div", { class: "stat" }, el("b", {}, value), el("span", {}, label));
  }

  function context(c, vocab, max) {
    const toks = [];
    const sep = state.index.meta.token_sep;   // " " for tokenizers that join words with spaces
    c.tok.forEach((t, w) => {
      if (w > 0 && c.pos[w] - c.pos[w - 1] > 1) {
        toks.push(sep, el("span", { class: "gap", title: "positions not in the data (BOS, padding, special tokens)" }, "\u00B7"));
      }
      if (w > 0) toks.push(sep);
      const text = vocab[t] !== undefined ? vocab[t] : `#${t}`;
      const a = c.a[w] / 1000;
      const value = w === c.peak ? c.act : a * max;
      toks.push(el("span", { class: w === c.peak ? "tok peak" : "tok", style: `background: rgba(224, 123, 42, ${a.toFixed(3)})`,
                             title: `position ${c.pos[w]}: ${w === c.peak ? "" : "\u2248"}${num(value)}` }, shown(text)));
    });
    const label = c.pct !== undefined ? `${num(c.act)} \u00B7 p${Math.round(c.pct)}` : num(c.act);
    return el("div", { class: "context", "data-seq": c.seq }, el("span", { class: "val" }, label), el("span", { class: "toks" }, toks));
  }

  function samples(e, vocab) {
    if (!e.samples.length) return el("p", { class: "note" }, "None kept.");
    const bands = [[75, 101, "75th to 100th percentile"], [50, 75, "50th to 75th"], [25, 50, "25th to 50th"], [0, 25, "below the 25th"]];
    const out = [el("p", { class: "note" }, `${e.samples.length} tokens drawn uniformly from the ${e.count.toLocaleString()} ` +
      "it fires on (a reservoir sample), so the lower percentiles show what typical firing looks like; " +
      "percentiles from the exact histogram.")];
    for (const [lo, hi, name] of bands) {
      const group = e.samples.filter((c) => c.pct >= lo && c.pct < hi);
      if (group.length) out.push(el("div", { class: "band" }, `${name} (${group.length})`), group.map((c) => context(c, vocab, e.max)));
    }
    return out;
  }

  function histogram(e) {
    const counts = e.hist.counts;
    if (!counts.some((c) => c > 0)) return el("p", { class: "note" }, "It never fired.");
    return barChart(counts, 0, e.hist.hi, "bar", (a) => num(a), e.max);
  }

  function barChart(counts, lo, hi, cls, tick, mark) {
    const W = 520, H = 190, L = 44, B = 24, top = Math.max(...counts);
    const s = svgEl("svg", { width: W, height: H + 8, viewBox: `0 0 ${W} ${H + 8}`, role: "img" });
    const bw = (W - L - 8) / counts.length;
    counts.forEach((c, j) => {
      const h = top ? ((H - B - 6) * c) / top : 0;
      const r = svgEl("rect", { class: cls, x: L + j * bw + 0.5, y: H - B - h, width: Math.max(1, bw - 1), height: h });
      const a = lo + ((hi - lo) * j) / counts.length, b = lo + ((hi - lo) * (j + 1)) / counts.length;
      r.append(svgEl("title", {}, `${tick(a)} to ${tick(b)}: ${c}`));
      s.append(r);
    });
    s.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - 8, y2: H - B }));
    for (const [f, anchor] of [[0, "start"], [0.5, "middle"], [1, "end"]]) {
      s.append(svgEl("text", { x: L + f * (W - L - 8), y: H - 6, "text-anchor": anchor }, tick(lo + f * (hi - lo))));
    }
    s.append(svgEl("text", { x: L - 6, y: 14, "text-anchor": "end" }, String(top)));
    s.append(svgEl("text", { x: L - 6, y: H - B, "text-anchor": "end" }, "0"));
    if (mark !== null) {
      const x = L + ((mark - lo) / (hi - lo)) * (W - L - 8);
      s.append(svgEl("line", { class: "mark", x1: x, y1: 8, x2: x, y2: H - B }));
      s.append(svgEl("text", { x: x - 4, y: 18, "text-anchor": "end" }, `max ${num(mark)}`));
    }
    return s;
  }

  function neighbours(e) {
    if (!e.near.length) return el("p", { class: "note" }, "No other latents.");
    return el("table", {}, e.near.map(([j, cos]) => el("tr", {},
      el("td", {}, el("a", { href: `#latent=${j}` }, `#${j}`)), el("td", { class: "num" }, cos.toFixed(3)))));
  }

  function outputTokens(e, vocab) {
    if (!e.logits) {
      return el("p", { class: "note" }, state.index.meta.output_tokens === false
        ? "The model has no unembedding here (or was not loaded), so there are no output tokens." : "None.");
    }
    const list = (items, cls) => el("table", {}, items.map(([t, v]) => el("tr", {},
      el("td", {}, el("span", { class: `chip ${cls}` }, shown(vocab[t] !== undefined ? vocab[t] : `#${t}`))),
      el("td", { class: "num" }, num(v)))));
    return el("div", { class: "cols" }, el("div", {}, el("b", {}, "promoted"), list(e.logits.up, "up")),
                                        el("div", {}, el("b", {}, "suppressed"), list(e.logits.down, "down")));
  }

  function binding(b) {
    const head = el("tr", {}, el("th", {}, "slot"), el("th", {}, "latent"), el("th", { class: "num" }, "density"),
      el("th", { class: "num" }, "max"), el("th", { class: "num" }, "cos(M_s d, d)"), el("th", {}, "M_s d is nearest to atoms"));
    const rows = b.slots.map((s) => el("tr", {},
      el("td", {}, `${s.slot + 1}${s.slot === b.slot ? " (this)" : ""}`),
      el("td", {}, el("a", { href: `#latent=${s.latent}` }, `#${s.latent}`)),
      el("td", { class: "num" }, `${percent(s.density)} (${s.count.toLocaleString()})`),
      el("td", { class: "num" }, num(s.max)), el("td", { class: "num" }, s.self_cos.toFixed(3)),
      el("td", {}, s.near.map(([a, c]) => el("span", { class: "chip" }, `${a}: ${c.toFixed(2)}`)))));
    return [el("p", { class: "note" }, `Atom ${b.atom} of the shared dictionary D decodes as M_s d in slot s (M_1 = I). ` +
      "Each row: that slot's latent for the atom, how often it fires, and which atoms of D the transformed atom points to."),
      el("table", {}, head, rows)];
  }
})();
