// The nicsplit dashboard: vanilla JS, no dependency, charts drawn as SVG.
// Every number comes from the console's REST API (/api/v1, bearer token);
// the page itself holds no data. docs/operations.md "Dashboard".
"use strict";
(() => {
  const KEY = "nicsplit.token";
  const SVGNS = "http://www.w3.org/2000/svg";
  const POLL_MS = 2000;
  const PITS_EVERY = 15;  // polls: listing PITs reads the journal, so every 30 s (and on demand)
  const $ = (sel, root = document) => root.querySelector(sel);

  // ---- DOM helpers (textContent only: nothing from the API becomes markup)
  function build(el, attrs, kids) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
  const s = (tag, attrs, ...kids) => build(document.createElementNS(SVGNS, tag), attrs, kids);

  // ---- formatting
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i && Math.abs(n) < 10 ? 1 : 0)} ${u[i]}`;
  }
  function fmtSeconds(x) {
    if (x === null || x === undefined) return "–";
    if (x < 1) return `${(x * 1000).toFixed(0)} ms`;
    if (x < 120) return `${x.toFixed(x < 10 ? 1 : 0)} s`;
    if (x < 7200) return `${(x / 60).toFixed(0)} min`;
    if (x < 172800) return `${(x / 3600).toFixed(1)} h`;
    return `${(x / 86400).toFixed(1)} d`;
  }
  const pad = (n) => String(n).padStart(2, "0");
  function fmtClock(t) {
    const d = new Date(t * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtTime(t) {
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(t)}`;
  }
  const fmtRatio = (r) => (r === null || r === undefined ? "–" : `${Number(r).toFixed(2)}×`);
  const fmtPercent = (r) => (r === null || r === undefined ? "–" : `${(100 * r).toFixed(0)} %`);
  const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);

  // ---- the token and the API
  class AuthError extends Error {}
  function tokenFromFragment() {
    const m = location.hash.match(/(?:^#|&)token=([^&]*)/);
    if (m) {
      sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
      // Out of the address bar, the history and any screenshot of it.
      history.replaceState(null, "", location.pathname + location.search);
    }
  }
  async function api(method, path, body) {
    const token = sessionStorage.getItem(KEY);
    if (!token) { showLogin(""); throw new AuthError("no token"); }
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, cache: "no-store",
                                  body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      showLogin("The console refused that token (401).");
      throw new AuthError("401");
    }
    const doc = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(doc.error || `${method} ${path}: ${r.status} ${r.statusText}`);
    return doc;
  }

  // ---- state
  const views = new Map();      // cg name -> its DOM parts
  const series = new Map();     // cg name -> history samples, oldest first
  const pits = new Map();       // cg name -> {pits, damage}
  const selected = new Map();   // cg name -> selected seq
  let images = [];
  let status = null;
  let windowSeconds = 3600;
  let running = false;
  let generation = 0;  // a sign-in starts a new polling loop; an older one stops at its next step
  let timer = null;
  let ticks = 0;

  function showLogin(message) {
    running = false;
    clearTimeout(timer);
    $("#login-msg").textContent = message;
    $("#login").hidden = false;
    $("#main").hidden = true;
    $("#logout").hidden = true;
    $("#token-input").focus();
  }
  function start() {
    $("#login").hidden = true;
    $("#main").hidden = false;
    $("#logout").hidden = false;
    running = true;
    ticks = 0;
    clearTimeout(timer);
    loop(++generation);
  }

  async function loop(gen) {
    if (!running || gen !== generation) return;
    try {
      await refreshStatus();
      const work = [];
      if (ticks % 2 === 0) work.push(refreshHistory());
      for (const name of views.keys()) {
        const none = !(pits.get(name)?.pits?.length);
        if (!document.hidden && (ticks % PITS_EVERY === 0 || none)) work.push(refreshPits(name));
      }
      if (ticks % 3 === 0) work.push(refreshImages());
      await Promise.all(work);
      $("#error").textContent = "";
    } catch (e) {
      if (e instanceof AuthError) return;
      $("#error").textContent = `${e.message}`;
    }
    if (!running || gen !== generation) return;
    ticks++;
    timer = setTimeout(() => loop(gen), POLL_MS);
  }

  // ---- status: processes, alerts, CG heads and vdisks
  async function refreshStatus() {
    status = await api("GET", "/api/v1/status");
    $("#updated").textContent = `updated ${fmtClock(Date.now() / 1000)}`;
    const procs = $("#processes");
    procs.replaceChildren(...Object.entries(status.processes || {}).map(([name, p]) =>
      h("span", { class: `proc ${p && p.pid ? "up" : "down"}`, "data-process": name,
                  title: p && p.pid ? `pid ${p.pid}` : "not running" }, name)));
    const card = status.card || {};
    const alerts = (status.alerts || []).map((a) =>
      h("div", { class: `alert sev-${a.severity || "warning"}`, "data-alert": a.name },
        h("strong", {}, `${a.severity || "alert"}: `), a.cg ? `${a.cg}: ` : "", a.message || a.name));
    if (num(card.hidden_volume_fill) !== null || num(card.overflow_fill) !== null) {
      alerts.push(h("div", { class: "card-fill muted" },
        `card: hidden volume ${fmtPercent(num(card.hidden_volume_fill))} full, overflow log ${fmtPercent(num(card.overflow_fill))}`
        + (num(card.overflow_bytes) !== null ? ` (${fmtBytes(card.overflow_bytes)})` : "")));
    }
    $("#alerts").replaceChildren(...alerts);
    const cgs = status.cgs || [];
    $("#no-cgs").hidden = cgs.length > 0;
    const names = new Set(cgs.map((c) => c.name));
    for (const [name, v] of views) {
      if (!names.has(name)) { v.root.remove(); views.delete(name); }
    }
    for (const c of cgs) {
      if (!views.has(c.name)) {
        const v = cgView(c.name);
        views.set(c.name, v);
        $("#cgs").append(v.root);
      }
      updateHead(views.get(c.name), c);
    }
  }

  function cgView(name) {
    const v = { name };
    v.state = h("span", { class: "state" });
    v.facts = h("dl", { class: "facts" });
    v.vdisks = h("tbody");
    v.rpo = s("svg", { viewBox: "0 0 600 160", class: "chart-svg", role: "img", "aria-label": `RPO of ${name}` });
    v.rpoLegend = h("span", { class: "legend" });
    v.tp = s("svg", { viewBox: "0 0 600 160", class: "chart-svg", role: "img", "aria-label": `throughput of ${name}` });
    v.tpLegend = h("span", { class: "legend" });
    v.timeline = s("svg", { viewBox: "0 0 900 96", class: "timeline-svg", role: "img", "aria-label": `points in time of ${name}` });
    v.timeline.addEventListener("click", (e) => pickAt(v, e));
    v.span = h("select", { class: "span", "aria-label": "timeline span", onchange: () => drawTimeline(v) },
      ...[["0", "everything"], ["604800", "7 days"], ["86400", "24 hours"], ["3600", "1 hour"], ["300", "5 minutes"]]
        .map(([val, label]) => h("option", { value: val }, label)));
    v.refreshBtn = h("button", { type: "button", class: "refresh-pits", onclick: () => refreshPits(name).catch((e) => {
      if (!(e instanceof AuthError)) v.msg.textContent = `listing PITs failed: ${e.message}`;
    }) }, "Refresh");
    v.pitSelect = h("select", { class: "pit-select", "aria-label": "point in time", onchange: () => {
      if (v.pitSelect.value) select(v, Number(v.pitSelect.value));
    } });
    v.pitInfo = h("span", { class: "pit-info" }, "pick a point in time on the timeline");
    v.writable = h("input", { type: "checkbox", class: "writable" });
    v.exportBtn = h("button", { type: "button", class: "export", disabled: true, onclick: () => exportImage(v) }, "Export image");
    v.restoreBtn = h("button", { type: "button", class: "restore", disabled: true, onclick: () => showRestore(v) }, "Restore…");
    v.restoreHelp = h("pre", { class: "restore-help", hidden: true });
    v.msg = h("p", { class: "action-msg", role: "status" });
    v.bmName = h("input", { type: "text", class: "bookmark-name", placeholder: "bookmark name", "aria-label": "bookmark name" });
    v.bmBtn = h("button", { type: "button", class: "bookmark", onclick: () => bookmark(v) }, "Bookmark now");
    v.images = h("div", { class: "images" });
    v.root = h("section", { class: "cg", "data-cg": name },
      h("div", { class: "cg-head" }, h("h2", {}, name), v.state, v.facts),
      h("table", { class: "vdisks" },
        h("thead", {}, h("tr", {}, h("th", {}, "vdisk"), h("th", {}, "state"), h("th", {}, "dirty"), h("th", {}, "resync"))),
        v.vdisks),
      h("div", { class: "charts" },
        h("figure", { class: "chart rpo" }, h("figcaption", {}, "RPO ", v.rpoLegend), v.rpo),
        h("figure", { class: "chart throughput" }, h("figcaption", {}, "Throughput ", v.tpLegend), v.tp)),
      h("div", { class: "timeline" },
        h("div", { class: "timeline-head" }, h("h3", {}, "Points in time"), h("span", { class: "spacer" }),
          h("label", {}, "show ", v.span), v.refreshBtn),
        v.timeline,
        h("div", { class: "pit-controls" }, v.pitSelect, v.pitInfo),
        h("div", { class: "pit-actions" },
          v.exportBtn, h("label", {}, v.writable, " writable"), v.restoreBtn,
          h("span", { class: "spacer" }), v.bmName, v.bmBtn),
        v.msg, v.restoreHelp),
      v.images);
    return v;
  }

  function fact(label, value, cls) {
    return [h("dt", {}, label), h("dd", { class: cls }, value)];
  }

  function updateHead(v, c) {
    v.cg = c;
    v.state.textContent = c.state;
    v.state.className = `state state-${c.state}`;
    v.state.title = c.refused || "";
    const tp = c.throughput || {};
    const lat = c.split_latency_us || {};
    const lb = c.last_bookmark;
    v.facts.replaceChildren(
      ...fact("RPO", fmtSeconds(num(c.rpo_seconds)) + (num(c.rpo_bytes) !== null ? ` / ${fmtBytes(c.rpo_bytes)}` : ""), "rpo"),
      ...fact("window", fmtSeconds(num(c.protection_window?.seconds)), "window"),
      ...(num(c.journal_bytes) !== null ? fact("journal", fmtBytes(c.journal_bytes), "journal") : []),
      ...(lb ? fact("last bookmark", `${lb.name || ""}${num(lb.time) !== null ? ` (${fmtTime(lb.time)})` : ""}`, "last-bookmark") : []),
      ...(num(tp.in_bytes_per_s) !== null ? fact("in / out", `${fmtBytes(tp.in_bytes_per_s)}/s / ${fmtBytes(tp.out_bytes_per_s)}/s`, "throughput") : []),
      ...(num(c.compression_ratio) !== null ? fact("compression", fmtRatio(c.compression_ratio), "compression") : []),
      ...(num(c.dedup_ratio) !== null ? fact("dedup", fmtRatio(c.dedup_ratio), "dedup") : []),
      ...(num(lat.p50) !== null ? fact("split p50 / p99", `${lat.p50.toFixed(0)} / ${num(lat.p99)?.toFixed(0) ?? "–"} µs`, "split-latency") : []),
      ...fact("seq host / journal", `${c.host_last_seq ?? "–"} / ${c.last_durable_seq ?? "–"}`, "seqs"),
      ...(c.role && c.role !== "production" ? fact("role", c.role, "role") : []));
    v.vdisks.replaceChildren(...(c.vdisks || []).map((d) => {
      const pct = num(d.resync?.percent);
      return h("tr", { "data-vdisk": d.name },
        h("td", {}, d.name),
        h("td", {}, h("span", { class: `state state-${d.state}`, title: d.reason || "" }, d.state)),
        h("td", {}, fmtBytes(d.dirty_bytes || 0)),
        h("td", {}, pct === null ? "–" : h("span", { class: "progress" },
          h("progress", { max: "100", value: String(pct) }),
          ` ${pct.toFixed(1)} %${num(d.resync.eta_s) !== null ? `, ${fmtSeconds(d.resync.eta_s)} left` : ""}`)));
    }));
  }

  // ---- history charts
  async function refreshHistory() {
    await Promise.all([...views.keys()].map(async (name) => {
      const have = series.get(name) || [];
      const since = have.length ? have[have.length - 1].t : null;
      const doc = await api("GET", `/api/v1/history?cg=${encodeURIComponent(name)}${since !== null ? `&since=${since}` : ""}`);
      windowSeconds = doc.window_seconds || windowSeconds;
      const all = have.concat(doc.samples || []);
      const cut = Date.now() / 1000 - windowSeconds;
      const kept = all.filter((p) => p.t >= cut);
      series.set(name, kept);
      drawCharts(views.get(name), kept);
    }));
  }

  const STATE_COLOURS = {
    protected: "#2e9d4e", lagging: "#c9a227", initializing: "#3b7dd8", resyncing: "#3b7dd8", marking: "#e07b21",
    "card-down": "#cc3333", "host-down": "#cc3333", refused: "#cc3333", "failed-over": "#8250c4",
  };

  function drawCharts(v, samples) {
    if (!v) return;
    const rpo = [{ key: "rpo_seconds", label: "RPO", colour: "#3b7dd8" }];
    drawChart(v.rpo, v.rpoLegend, samples, rpo, fmtSeconds, true);
    const bytes = samples.some((p) => num(p.in_bytes_per_s) !== null || num(p.out_bytes_per_s) !== null);
    const tp = bytes
      ? [{ key: "in_bytes_per_s", label: "in", colour: "#2e9d4e" }, { key: "out_bytes_per_s", label: "out", colour: "#8250c4" }]
      : [{ key: "writes_per_s", label: "writes split", colour: "#2e9d4e" }, { key: "durable_per_s", label: "journaled", colour: "#8250c4" }];
    drawChart(v.tp, v.tpLegend, samples, tp, bytes ? (x) => `${fmtBytes(x)}/s` : (x) => `${x.toFixed(x < 10 ? 1 : 0)}/s`, false,
              bytes ? 1024 : 1);
  }

  // The axis top: 1, 2, 2.5, 5 or 10 times a power of ten, in units of `unit`
  // (1024 for bytes: a byte axis reads 10 KiB, not 9.8 KiB).
  function niceMax(x, unit = 1) {
    if (!(x > 0)) return 1;
    if (unit > 1 && x >= unit) {
      const k = Math.floor(Math.log(x) / Math.log(unit));
      return niceMax(x / Math.pow(unit, k)) * Math.pow(unit, k);
    }
    const e = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * e >= x) return m * e;
    return 10 * e;
  }

  // A line chart: time on x (the samples' span, at least a minute), one
  // polyline per series broken where a value is missing; with `states`, a
  // strip under the plot coloured by the CG's state at each sample.
  function drawChart(svg, legend, samples, lines, fmt, states, unit = 1) {
    const W = 600, H = 160, L = 62, R = 8, T = 8, B = states ? 34 : 24;
    const now = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    const t0 = Math.min(samples.length ? samples[0].t : now, now - 60);
    const t1 = now;
    let vmax = 0;
    for (const p of samples) for (const l of lines) vmax = Math.max(vmax, num(p[l.key]) ?? 0);
    vmax = niceMax(vmax, unit);
    const x = (t) => L + ((t - t0) / (t1 - t0 || 1)) * (W - L - R);
    const y = (val) => H - B - (val / vmax) * (H - B - T);
    const kids = [];
    for (const f of [0, 0.5, 1]) {
      kids.push(s("line", { x1: L, x2: W - R, y1: y(f * vmax), y2: y(f * vmax), class: "grid" }));
      kids.push(s("text", { x: L - 4, y: y(f * vmax) + 4, class: "axis", "text-anchor": "end" }, fmt(f * vmax)));
    }
    for (let i = 0; i <= 3; i++) {
      const t = t0 + (i / 3) * (t1 - t0);
      kids.push(s("text", { x: x(t), y: H - 4, class: "axis", "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle" }, fmtClock(t)));
    }
    if (states) {
      for (let i = 0; i < samples.length; i++) {
        const a = x(samples[i].t), b = i + 1 < samples.length ? x(samples[i + 1].t) : a + 2;
        kids.push(s("rect", { x: a, y: H - B + 6, width: Math.max(1, b - a), height: 6,
                              fill: STATE_COLOURS[samples[i].state] || "#999", class: "state-strip" },
                    s("title", {}, `${fmtClock(samples[i].t)} ${samples[i].state}`)));
      }
    }
    const legendKids = [];
    for (const l of lines) {
      let seg = [];
      const flush = () => { if (seg.length) kids.push(s("polyline", { points: seg.join(" "), stroke: l.colour, class: `line ${l.key}` })); seg = []; };
      for (const p of samples) {
        const val = num(p[l.key]);
        if (val === null) flush(); else seg.push(`${x(p.t).toFixed(1)},${y(val).toFixed(1)}`);
      }
      flush();
      const last = [...samples].reverse().find((p) => num(p[l.key]) !== null);
      const swatch = h("span", { class: "swatch" });
      swatch.style.background = l.colour;  // CSSOM, not a style attribute: the CSP forbids inline styles
      legendKids.push(swatch, ` ${l.label} ${last ? fmt(last[l.key]) : "–"} `);
    }
    if (!samples.length) kids.push(s("text", { x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle" }, "collecting samples…"));
    svg.replaceChildren(...kids);
    legend.replaceChildren(...legendKids);
  }

  // ---- the PIT timeline
  async function refreshPits(name) {
    const doc = await api("GET", `/api/v1/cgs/${encodeURIComponent(name)}/pits`);
    pits.set(name, doc);
    const v = views.get(name);
    if (v) drawTimeline(v);
  }

  const TL = { W: 900, H: 96, L: 12, R: 12, AXIS: 62 };

  // [t0, t1] of the timeline: from the oldest PIT (or `span` seconds back) to now.
  function timelineRange(v, list) {
    const now = Date.now() / 1000;
    const span = Number(v.span.value) || Infinity;
    const oldest = list.length ? list[0].time : now;
    const t0 = Math.min(Math.max(oldest, now - span), now - 60);
    return [t0, Math.max(now, list.length ? list[list.length - 1].time : now)];
  }
  const inView = (v, list) => { const [t0] = timelineRange(v, list); return list.filter((p) => p.time >= t0); };

  function drawTimeline(v) {
    const all = pits.get(v.name)?.pits || [];
    const list = inView(v, all);
    const [t0, t1] = timelineRange(v, all);
    const x = (t) => TL.L + ((t - t0) / (t1 - t0 || 1)) * (TL.W - TL.L - TL.R);
    const kids = [s("line", { x1: TL.L, x2: TL.W - TL.R, y1: TL.AXIS, y2: TL.AXIS, class: "axis-line" })];
    for (let i = 0; i <= 4; i++) {
      const t = t0 + (i / 4) * (t1 - t0);
      kids.push(s("text", { x: x(t), y: TL.H - 4, class: "axis", "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, fmtClock(t)));
    }
    // One dot per pixel column (the newest there): thousands of PITs stay drawable;
    // a click still picks the nearest PIT of the span shown.
    const cols = new Map();
    for (const p of list) cols.set(Math.round(x(p.time)), p);
    for (const [cx, p] of cols) {
      const cls = !p.usable ? "pit bad" : !p.consistent ? "pit gap" : "pit ok";
      kids.push(s("circle", { cx, cy: TL.AXIS, r: 4, class: cls, "data-seq": p.seq },
                  s("title", {}, `seq ${p.seq} ${fmtTime(p.time)}${p.consistent ? "" : " (inside a protection gap)"}`)));
    }
    for (const p of list) {
      for (const [i, b] of (p.bookmarks || []).entries()) {
        const bx = x(p.time);
        kids.push(s("g", { class: "bookmark-flag", "data-seq": p.seq, "data-bookmark": b },
          s("line", { x1: bx, x2: bx, y1: 14 + 12 * i, y2: TL.AXIS - 5 }),
          s("rect", { x: bx, y: 6 + 12 * i, width: 7 + 6.5 * b.length, height: 11, rx: 2 }),
          s("text", { x: bx + 3, y: 15 + 12 * i }, b),
          s("title", {}, `bookmark ${b}: seq ${p.seq} ${fmtTime(p.time)}`)));
      }
    }
    const sel = selected.get(v.name);
    const sp = all.find((p) => p.seq === sel);
    if (sp && sp.time >= t0) kids.push(s("circle", { cx: x(sp.time), cy: TL.AXIS, r: 8, class: "selected-marker" }));
    if (!list.length) {
      kids.push(s("text", { x: TL.W / 2, y: 30, class: "axis", "text-anchor": "middle" },
                  all.length ? "no point in time in this span" : "no point in time yet"));
    }
    v.timeline.replaceChildren(...kids);
    v.timeline.dataset.pits = String(all.length);
    // The picker: the latest, every bookmark and the newest few.
    const opts = [h("option", { value: "" }, all.length ? "— pick a point in time —" : "— none yet —")];
    const seen = new Set();
    const add = (p, label) => {
      if (seen.has(p.seq)) return;
      seen.add(p.seq);
      opts.push(h("option", { value: String(p.seq) }, label));
    };
    if (all.length) add(all[all.length - 1], `latest: seq ${all[all.length - 1].seq} ${fmtTime(all[all.length - 1].time)}`);
    for (const p of all) for (const b of p.bookmarks || []) add(p, `★ ${b}: seq ${p.seq} ${fmtTime(p.time)}`);
    for (const p of all.slice(-20).reverse()) add(p, `seq ${p.seq} ${fmtTime(p.time)}`);
    if (sp) add(sp, `seq ${sp.seq} ${fmtTime(sp.time)}`);
    v.pitSelect.replaceChildren(...opts);
    v.pitSelect.value = sp ? String(sp.seq) : "";
    describeSelection(v, sp);
  }

  function pickAt(v, e) {
    const all = pits.get(v.name)?.pits || [];
    const list = inView(v, all);
    if (!list.length) return;
    const tagged = e.target.closest("[data-seq]");
    if (tagged) return select(v, Number(tagged.dataset.seq));
    const pt = v.timeline.createSVGPoint();
    pt.x = e.clientX; pt.y = e.clientY;
    const px = pt.matrixTransform(v.timeline.getScreenCTM().inverse()).x;
    const [t0, t1] = timelineRange(v, all);
    const t = t0 + ((px - TL.L) / (TL.W - TL.L - TL.R)) * (t1 - t0);
    let best = list[0];
    for (const p of list) if (Math.abs(p.time - t) < Math.abs(best.time - t)) best = p;
    select(v, best.seq);
  }

  function select(v, seq) {
    selected.set(v.name, seq);
    v.restoreHelp.hidden = true;
    v.msg.textContent = "";
    drawTimeline(v);
  }

  function describeSelection(v, p) {
    v.exportBtn.disabled = !p || !p.usable;
    v.restoreBtn.disabled = !p || !p.usable;
    v.root.dataset.selectedSeq = p ? String(p.seq) : "";
    if (!p) { v.pitInfo.textContent = "pick a point in time on the timeline"; return; }
    v.pitInfo.textContent = `seq ${p.seq} · ${fmtTime(p.time)}`
      + ((p.bookmarks || []).length ? ` · bookmark ${p.bookmarks.join(", ")}` : "")
      + (p.consistent ? "" : " · inside a protection gap (not crash-consistent)")
      + (p.usable ? "" : ` · unusable: ${p.reason || "damaged journal"}`);
  }

  // ---- actions
  async function exportImage(v) {
    const seq = selected.get(v.name);
    if (!seq) return;
    v.exportBtn.disabled = true;
    v.msg.textContent = `exporting seq ${seq}…`;
    try {
      const img = await api("POST", "/api/v1/images", { cg: v.name, seq, writable: v.writable.checked });
      v.msg.textContent = `image ${img.id} of seq ${img.seq} is served (ready in ${img.ready_seconds ?? "?"} s)`;
      await refreshImages();
    } catch (e) {
      if (!(e instanceof AuthError)) v.msg.textContent = `export failed: ${e.message}`;
    } finally {
      v.exportBtn.disabled = false;
    }
  }

  async function closeImage(id, button) {
    button.disabled = true;
    try {
      await api("DELETE", `/api/v1/images/${encodeURIComponent(id)}`);
      await refreshImages();
    } catch (e) {
      if (!(e instanceof AuthError)) $("#error").textContent = `closing image ${id} failed: ${e.message}`;
      button.disabled = false;
    }
  }

  async function bookmark(v) {
    const name = v.bmName.value.trim();
    if (!name) { v.msg.textContent = "a bookmark needs a name"; return; }
    v.bmBtn.disabled = true;
    try {
      const b = await api("POST", `/api/v1/cgs/${encodeURIComponent(v.name)}/bookmarks`, { name });
      v.msg.textContent = `bookmark ${b.name} at seq ${b.seq}`;
      v.bmName.value = "";
      selected.set(v.name, b.seq);
      await refreshPits(v.name);
    } catch (e) {
      if (!(e instanceof AuthError)) v.msg.textContent = `bookmark failed: ${e.message}`;
    } finally {
      v.bmBtn.disabled = false;
    }
  }

  // Restore needs a target path on the appliance's machine: the page shows
  // the command (or API call) to run rather than guessing one.
  function showRestore(v) {
    const seq = selected.get(v.name);
    const vds = (v.cg?.vdisks || []).map((d) => d.name);
    v.restoreHelp.textContent = [
      `# restore seq ${seq} of ${v.name} to files (one per vdisk):`,
      ...vds.map((d) => `nicsplit restore ${d} --seq ${seq} --to /path/to/${d}-seq${seq}.raw`),
      "# or back onto production through the host (stays protected):",
      ...vds.map((d) => `nicsplit restore ${d} --seq ${seq} --in-place`),
    ].join("\n");
    v.restoreHelp.hidden = false;
  }

  async function refreshImages() {
    images = (await api("GET", "/api/v1/images")).images || [];
    for (const v of views.values()) {
      const mine = images.filter((i) => i.cg === v.name);
      v.images.replaceChildren(...(mine.length ? [h("h3", {}, "Open images")] : []), ...mine.map((img) =>
        h("div", { class: `image${img.alive === false ? " dead" : ""}`, "data-id": img.id },
          h("div", {}, h("strong", {}, `image ${img.id}`),
            ` · seq ${img.seq} · ${num(img.time) !== null ? fmtTime(img.time) : ""} · ${img.writable ? "writable" : "read-only"}`
            + (img.alive === false ? " · server not running" : "")),
          h("ul", { class: "exports" }, ...Object.entries(img.exports || {}).map(([vd, uri]) =>
            h("li", {}, `${vd}: `, h("code", { class: "nbd-uri" }, uri)))),
          h("button", { type: "button", class: "close-image", "data-id": img.id,
                        onclick: (e) => closeImage(img.id, e.currentTarget) }, "Close"))));
    }
  }

  // ---- start
  document.addEventListener("DOMContentLoaded", () => {
    $("#login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const t = $("#token-input").value.trim();
      if (!t) return;
      sessionStorage.setItem(KEY, t);
      $("#token-input").value = "";
      start();
    });
    $("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });
    tokenFromFragment();
    if (sessionStorage.getItem(KEY)) start(); else showLogin("");
  });
})();
