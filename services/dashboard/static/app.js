/* r2vpo training dashboard: polls the JSON API and draws uPlot charts. No framework, no build step. */
(() => {
  "use strict";

  // ---- state -------------------------------------------------------------------------------------
  const RECENT = 20; // staleness panels aggregate this many most recent steps per run
  const LIVE_HISTORY = 900; // live samples (queue depth, inference tokens/s) kept in the page
  const state = {
    runs: [], // RunInfo objects from /api/runs, in server order
    selected: new Set(),
    touched: false, // the user changed the selection: stop auto-selecting new runs
    data: {}, // run name → {epoch, next, rows, summary, summaryMtime, config, configMtime}
    live: null,
    liveHistory: [], // {t, queue, tps: {url: tokens/s}}
    refreshS: 2,
    maxPoints: 2000,
    xaxis: "step",
    charts: {}, // chart id → {u, key}
    dirty: true,
    failures: 0,
  };

  const $ = (sel, root = document) => root.querySelector(sel);
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "style") node.style.cssText = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  // ---- formatting --------------------------------------------------------------------------------
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  function fmtNum(v) {
    if (!isNum(v)) return "–";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5) return v.toExponential(2);
    if (a >= 100) return Math.round(v).toLocaleString("en-US");
    if (a < 0.001) return v.toExponential(2);
    return String(Number(v.toPrecision(3)));
  }
  function fmtDuration(s) {
    if (!isNum(s)) return "–";
    if (s < 120) return `${s.toFixed(1)} s`;
    if (s < 7200) return `${(s / 60).toFixed(s < 600 ? 1 : 0)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }
  function fmtTime(epochS) {
    if (!isNum(epochS)) return "–";
    return new Date(epochS * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  }
  /** Decimals needed to print multiples of the tick spacing `incr` exactly. */
  function decimalsOf(incr) {
    const s = String(+(+incr).toPrecision(3));
    if (s.includes("e-")) return Number(s.split("e-")[1]) + (s.split("e")[0].split(".")[1] || "").length;
    return (s.split(".")[1] || "").length;
  }
  /** Axis tick labels with as many decimals as the tick spacing needs (uPlot passes the spacing). */
  function ticks(u, splits, axisIdx, space, incr) {
    const big = Math.max(...splits.map((v) => Math.abs(v || 0)));
    if (big >= 1e5 || (big > 0 && big < 1e-3)) return splits.map((v) => (v === 0 ? "0" : v.toExponential(1)));
    return splits.map((v) => v.toFixed(Math.min(decimalsOf(incr), 8)));
  }
  /** Wall-time ticks in s, min or h (one unit per axis). */
  function durationTicks(u, splits, axisIdx, space, incr) {
    const big = Math.max(...splits.map((v) => Math.abs(v || 0)));
    const [div, unit] = big < 120 ? [1, "s"] : big < 7200 ? [60, "min"] : [3600, "h"];
    return splits.map((v) => `${(v / div).toFixed(Math.min(decimalsOf(incr / div), 3))} ${unit}`);
  }
  function fmtTask(task) {
    if (!task || typeof task !== "object") return null;
    const params = Object.entries(task.params || {}).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
    return params.length ? `${task.name} (${params.join(", ")})` : task.name;
  }
  const basename = (p) => (p ? String(p).replace(/\/+$/, "").split("/").pop() : "–");

  // ---- colours (per run, stable, readable in both schemes) ---------------------------------------
  const dark = window.matchMedia("(prefers-color-scheme: dark)");
  const PALETTE = {
    light: ["#1f6feb", "#d1242f", "#1a7f37", "#8250df", "#bc4c00", "#0a7a86", "#8c564b", "#bf3989"],
    dark: ["#58a6ff", "#ff7b72", "#56d364", "#bc8cff", "#ffa657", "#39c5cf", "#d2a679", "#ff80c8"],
  };
  function runColor(name) {
    const i = Math.max(0, state.runs.findIndex((r) => r.name === name));
    const pal = dark.matches ? PALETTE.dark : PALETTE.light;
    return pal[i % pal.length];
  }
  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // ---- x axes and chart specifications -----------------------------------------------------------
  const X = {
    step: { label: "optimizer step", get: (r) => r.step ?? r.batch ?? r._i + 1, fmt: fmtNum },
    rollouts: { label: "rollouts consumed", get: (r) => r.rollouts_consumed, fmt: fmtNum },
    wall: { label: "wall time", get: (r) => r.wall_s, fmt: fmtDuration },
  };
  const lamOf = (r) => r.lam_next ?? r.lam;
  const budgetOf = (r) => (isNum(r.ratio_var) && isNum(r.var_minus_budget) ? r.ratio_var - r.var_minus_budget : null);
  const DASH = [6, 4];

  // kind "rows": one line per run (and per series) from metrics rows; x "sel" follows the x-axis picker.
  const CHARTS = [
    { section: "learning", id: "reward-rollouts", title: "Reward vs rollouts consumed", x: "rollouts", series: [{ key: "reward_mean" }] },
    { section: "learning", id: "reward-wall", title: "Reward vs wall time", x: "wall", series: [{ key: "reward_mean" }] },
    { section: "learning", id: "acc-rollouts", title: "Held-out accuracy vs rollouts consumed", x: "rollouts", series: [{ key: "accuracy" }], initial: true, points: true },
    { section: "learning", id: "acc-wall", title: "Held-out accuracy vs wall time", x: "wall", series: [{ key: "accuracy" }], initial: true, points: true },
    { section: "health", id: "ratio-var", title: "Ratio variance vs budget δ", series: [{ key: "ratio_var", label: "Var(r)" }, { get: budgetOf, label: "δ", dash: DASH }], note: "Dashed: the budget δ of runs that apply one." },
    { section: "health", id: "var-minus-budget", title: "Var(r) − δ (above 0: over budget)", series: [{ key: "var_minus_budget" }] },
    { section: "health", id: "lam", title: "Dual variable λ", series: [{ get: lamOf, label: "λ" }], note: "λ after each step's dual update." },
    { section: "health", id: "would-clip", title: "Would-clip fraction (|r − 1| > 0.2)", series: [{ key: "would_clip_frac" }] },
    { section: "health", id: "ess", title: "Effective sample size (fraction)", series: [{ key: "ess" }] },
    { section: "health", id: "ratio-tail", title: "Ratio p99 and max", series: [{ key: "ratio_p99", label: "p99" }, { key: "ratio_max", label: "max", dash: DASH }] },
    { section: "health", id: "grad-norm", title: "Gradient norm (before clipping)", series: [{ key: "grad_norm" }] },
    { section: "health", id: "kl", title: "KL(behaviour ‖ current)", series: [{ key: "kl_k3", label: "k3" }, { key: "kl_k1", label: "k1", dash: DASH }] },
    { section: "health", id: "entropy", title: "Entropy (nats / token)", series: [{ key: "entropy" }] },
    { section: "health", id: "zero-var", title: "Zero-variance group share", series: [{ key: "zero_var_group_frac" }] },
    { section: "staleness", id: "lag-hist", kind: "lagbars", title: `Lag of trained samples (last ${RECENT} steps)` },
    { section: "staleness", id: "lag-ratio", kind: "lag", field: "ratio_mean", title: `Mean ratio by lag (last ${RECENT} steps)` },
    { section: "staleness", id: "lag-weight", kind: "lag", field: "effective_weight", title: `Effective weight by lag (last ${RECENT} steps)` },
    { section: "staleness", id: "dropped", title: "Groups dropped (cumulative)", series: [{ cumulative: "groups_dropped" }] },
    { section: "system", id: "tokens", title: "Learner tokens/s", series: [{ key: "learner_tokens_per_s" }] },
    { section: "system", id: "publish", title: "Weight publish duration (s)", series: [{ key: "publish_s" }], missing: "Not reported: the synchronous trainer publishes no weights." },
    { section: "system", id: "version", title: "Policy version at the learner", series: [{ key: "version" }] },
    { section: "system", id: "queue", kind: "live", title: "Queue depth (trajectory stream)", live: "queue" },
    { section: "system", id: "inference-tps", kind: "live", title: "Inference tokens/s", live: "tps" },
  ];

  // ---- networking --------------------------------------------------------------------------------
  async function getJSON(url) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 15000);
    try {
      const resp = await fetch(url, { signal: ctrl.signal, cache: "no-store" });
      if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
      return await resp.json();
    } finally {
      clearTimeout(timer);
    }
  }
  const runUrl = (name, what) => `api/runs/${encodeURIComponent(name)}/${what}`;

  async function fetchRun(info) {
    const d = (state.data[info.name] ||= { epoch: null, next: 0, rows: [] });
    let resp = await getJSON(`${runUrl(info.name, "metrics")}?after=${d.next}&max_points=${state.maxPoints}`);
    if (d.epoch !== null && (resp.epoch !== d.epoch || resp.total < d.next)) {
      Object.assign(d, { next: 0, rows: [] }); // the run was restarted in place: read it again
      resp = await getJSON(`${runUrl(info.name, "metrics")}?max_points=${state.maxPoints}`);
    }
    d.epoch = resp.epoch;
    if (resp.rows.length) {
      d.rows.push(...resp.rows);
      if (d.rows.length > 4 * state.maxPoints) d.rows = d.rows.filter((r, i) => i % 2 === 0 || "accuracy" in r || i === d.rows.length - 1);
      state.dirty = true;
    }
    d.next = resp.next;
    if (info.summary_mtime != null && info.summary_mtime !== d.summaryMtime) {
      d.summary = await getJSON(runUrl(info.name, "summary"));
      d.summaryMtime = info.summary_mtime;
      state.dirty = true;
    }
    if (info.config_mtime != null && info.config_mtime !== d.configMtime) {
      d.config = await getJSON(runUrl(info.name, "config"));
      d.configMtime = info.config_mtime;
      state.dirty = true;
    }
  }

  async function tick() {
    try {
      const list = await getJSON("api/runs");
      state.refreshS = list.refresh_s || state.refreshS;
      state.maxPoints = list.max_points || state.maxPoints;
      const known = new Set(state.runs.map((r) => r.name));
      if (JSON.stringify(list.runs) !== JSON.stringify(state.runs)) state.dirty = true;
      state.runs = list.runs;
      for (const r of list.runs) if (!known.has(r.name) && !state.touched) state.selected.add(r.name);
      for (const name of [...state.selected]) if (!list.runs.some((r) => r.name === name)) state.selected.delete(name);
      await Promise.all(list.runs.filter((r) => state.selected.has(r.name)).map(fetchRun));
      const live = await getJSON("api/live");
      recordLive(live);
      state.failures = 0;
      $("#banner").hidden = true;
      $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      state.failures += 1;
      const banner = $("#banner");
      banner.hidden = false;
      banner.textContent = `Cannot reach the dashboard server (${err.message || err}); retrying…`;
    }
    if (state.dirty) render();
    const delay = state.refreshS * 1000 * Math.min(2 ** Math.max(state.failures - 1, 0), 8);
    setTimeout(tick, delay);
  }

  function recordLive(live) {
    const prev = JSON.stringify(state.live);
    state.live = live;
    if (JSON.stringify(live) !== prev) state.dirty = true;
    const tps = {};
    for (const rep of live.inference || []) if (isNum(rep.tokens_per_s)) tps[rep.url] = rep.tokens_per_s;
    const queue = live.redis && live.redis.ok ? live.redis.queue_length : null;
    const last = state.liveHistory[state.liveHistory.length - 1];
    if (!last || live.time > last.t) state.liveHistory.push({ t: live.time, queue, tps });
    if (state.liveHistory.length > LIVE_HISTORY) state.liveHistory.shift();
  }

  // ---- data shaping ------------------------------------------------------------------------------
  const selectedRuns = () => state.runs.filter((r) => state.selected.has(r.name));
  const rowsOf = (name) => (state.data[name] ? state.data[name].rows : []);

  function initialAccuracy(name) {
    const s = state.data[name] && state.data[name].summary;
    if (!s) return null;
    const first = Array.isArray(s.accuracy_curve) && s.accuracy_curve[0];
    if (first && isNum(first.accuracy)) return { step: first.step ?? 0, rollouts_consumed: first.rollouts ?? 0, wall_s: first.wall_s ?? 0, accuracy: first.accuracy };
    return isNum(s.initial_accuracy) ? { step: 0, rollouts_consumed: 0, wall_s: 0, accuracy: s.initial_accuracy } : null;
  }

  /** [xs, ys] of one series of one run: numeric points only, sorted by x, last value wins per x. */
  function seriesTable(rows, xget, s) {
    const byX = new Map();
    let total = 0;
    for (const r of rows) {
      const x = xget(r);
      let y = s.get ? s.get(r) : r[s.key];
      if (s.cumulative) y = total += isNum(r[s.cumulative]) ? r[s.cumulative] : 0;
      if (isNum(x) && isNum(y)) byX.set(x, y);
    }
    const xs = [...byX.keys()].sort((a, b) => a - b);
    return [xs, xs.map((x) => byX.get(x))];
  }

  function rowsChart(spec) {
    const xk = spec.x || state.xaxis;
    const tables = [], series = [], missing = [];
    for (const run of selectedRuns()) {
      let rows = rowsOf(run.name);
      if (spec.initial) {
        const init = initialAccuracy(run.name);
        if (init) rows = [init, ...rows];
      }
      let any = false;
      for (const s of spec.series) {
        const t = seriesTable(rows, X[xk].get, s);
        if (!t[0].length) continue;
        any = true;
        tables.push(t);
        const label = spec.series.length > 1 ? `${run.name} · ${s.label}` : run.name;
        series.push({ label, stroke: runColor(run.name), width: 2, dash: s.dash, spanGaps: true, points: { show: spec.points || t[0].length < 3, size: 6 } });
      }
      if (!any) missing.push(run.name);
    }
    return { xk, tables, series, missing };
  }

  /** Lag histogram and token-weighted per-lag stats over each run's last RECENT rows. */
  function lagStats(name) {
    const counts = {}, stats = {};
    for (const r of rowsOf(name).slice(-RECENT)) {
      for (const [lag, n] of Object.entries(r.staleness_histogram || {})) counts[lag] = (counts[lag] || 0) + n;
      for (const [lag, p] of Object.entries(r.per_lag || {})) {
        const acc = (stats[lag] ||= { tokens: 0, ratio_mean: 0, effective_weight: 0 });
        if (!isNum(p.tokens) || p.tokens <= 0) continue;
        acc.tokens += p.tokens;
        for (const f of ["ratio_mean", "effective_weight"]) if (isNum(p[f])) acc[f] += p[f] * p.tokens;
      }
    }
    for (const acc of Object.values(stats)) for (const f of ["ratio_mean", "effective_weight"]) acc[f] = acc.tokens ? acc[f] / acc.tokens : null;
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    return { counts, stats, total };
  }

  // ---- chart cards -------------------------------------------------------------------------------
  function buildCards() {
    for (const spec of CHARTS) {
      const grid = document.querySelector(`.grid[data-section="${spec.section}"]`);
      const card = el("figure", { class: "chart-card", id: `chart-${spec.id}`, "data-chart": spec.id, "data-state": "empty" },
        el("h3", { text: spec.title }), el("div", { class: "plot" }), el("p", { class: "empty-text", text: "Waiting for the first step…" }),
        spec.kind === "lagbars" ? el("p", { class: "hist-summary" }) : null, el("p", { class: "note", text: spec.note || "" }));
      card.style.margin = "0";
      grid.append(card);
      new ResizeObserver(() => resizeChart(spec.id)).observe(card);
    }
  }

  function plotWidth(card) {
    return Math.max(200, card.querySelector(".plot").clientWidth || card.clientWidth - 20);
  }
  function resizeChart(id) {
    const c = state.charts[id];
    const card = document.getElementById(`chart-${id}`);
    if (c && card) {
      const w = plotWidth(card);
      if (Math.abs(c.u.width - w) > 1) c.u.setSize({ width: w, height: c.u.height });
    }
  }

  /** uPlot's default range, except that a flat series (λ stuck at 0) gets a small, honest span. */
  function yRange(u, min, max) {
    if (min == null || max == null) return [0, 1];
    if (min === max) return min === 0 ? [0, 1] : [min - Math.abs(min) * 0.1, max + Math.abs(max) * 0.1];
    return uPlot.rangeNum(min, max, 0.1, true);
  }

  function axes(xfmt, yfmt, xLabel) {
    const stroke = cssVar("--axis"), grid = { stroke: cssVar("--grid"), width: 1 }, tick = { stroke: cssVar("--grid"), width: 1 };
    const font = "11px system-ui, sans-serif";
    return [
      { stroke, grid, ticks: tick, font, label: xLabel, labelFont: font, labelSize: 16, size: 30, values: xfmt === "time" ? undefined : xfmt === "duration" ? durationTicks : xfmt ? (u, vals) => vals.map(xfmt) : ticks },
      { stroke, grid, ticks: tick, font, size: 56, values: yfmt ? (u, vals) => vals.map(yfmt) : ticks },
    ];
  }

  /** Create or update the uPlot of a card; `key` changes (series, theme, axis) force a rebuild. */
  function draw(spec, opts, data, emptyText, extraKey = "") {
    const card = document.getElementById(`chart-${spec.id}`);
    const plot = card.querySelector(".plot");
    const empty = card.querySelector(".empty-text");
    const old = state.charts[spec.id];
    if (!data) {
      if (old) old.u.destroy();
      delete state.charts[spec.id];
      plot.replaceChildren();
      empty.textContent = emptyText;
      empty.hidden = false;
      card.dataset.state = "empty";
      return;
    }
    empty.hidden = true;
    card.dataset.state = "ready";
    const key = JSON.stringify([opts.series.map((s) => [s.label, s.stroke, s.dash]), dark.matches, extraKey]);
    if (old && old.key === key) {
      old.u.setData(data);
      return;
    }
    if (old) old.u.destroy();
    plot.replaceChildren();
    const u = new uPlot({ width: plotWidth(card), height: 210, legend: { live: true }, cursor: { points: { size: 6 } }, ...opts }, data, plot);
    state.charts[spec.id] = { u, key };
  }

  function emptyMessage(spec, missing) {
    const runs = selectedRuns();
    if (!runs.length) return "Select a run above.";
    if (runs.every((r) => !rowsOf(r.name).length)) return "Waiting for the first step…";
    return spec.missing || `Not reported by ${missing.join(", ")}.`;
  }

  function renderRowsChart(spec) {
    const { xk, tables, series, missing } = rowsChart(spec);
    const note = card(spec).querySelector(".note");
    note.textContent = [spec.note, tables.length && missing.length ? `Not reported by ${missing.join(", ")}.` : ""].filter(Boolean).join(" ");
    if (!tables.length) return draw(spec, null, null, emptyMessage(spec, missing));
    const xs = X[xk];
    const xfmt = xk === "wall" ? "duration" : null;
    const opts = { series: [{ label: xs.label, value: (u, v) => xs.fmt(v) }, ...series.map((s) => ({ ...s, value: (u, v) => fmtNum(v) }))], axes: axes(xfmt, null, xs.label), scales: { x: { time: false }, y: { range: yRange } } };
    draw(spec, opts, uPlot.join(tables), "", xk);
  }
  const card = (spec) => document.getElementById(`chart-${spec.id}`);

  function lagAxisOpts(maxLag, yfmt) {
    const ax = axes((v) => (Number.isInteger(v) ? String(v) : ""), yfmt, "lag (versions behind)");
    ax[0].splits = () => Array.from({ length: maxLag + 1 }, (_, i) => i);
    return { axes: ax, scales: { x: { time: false, range: () => [-0.6, maxLag + 0.6] } } };
  }

  function renderLagChart(spec) {
    const runs = selectedRuns().map((r) => ({ name: r.name, ...lagStats(r.name) }));
    const withData = runs.filter((r) => (spec.kind === "lagbars" ? r.total > 0 : Object.keys(r.stats).length));
    const missing = runs.filter((r) => !withData.includes(r)).map((r) => r.name);
    if (!withData.length) {
      if (spec.kind === "lagbars") card(spec).querySelector(".hist-summary").replaceChildren();
      return draw(spec, null, null, emptyMessage(spec, missing));
    }
    const lags = withData.flatMap((r) => Object.keys(spec.kind === "lagbars" ? r.counts : r.stats).map(Number));
    const maxLag = Math.max(0, ...lags);
    const xs = Array.from({ length: maxLag + 1 }, (_, i) => i);
    const n = withData.length, w = 0.8 / n;
    const data = [xs], series = [{ label: "lag", value: (u, v) => (v == null ? "–" : `lag ${v}`) }];
    withData.forEach((r, k) => {
      const color = runColor(r.name);
      if (spec.kind === "lagbars") {
        data.push(xs.map((x) => (r.counts[x] ? (100 * r.counts[x]) / r.total : null)));
        series.push({
          label: r.name, stroke: color, fill: color + "b3", width: 1, value: (u, v) => (v == null ? "–" : `${v.toFixed(1)} %`),
          paths: uPlot.paths.bars({ disp: { x0: { unit: 1, values: (u) => u.data[0].map((x) => x - 0.4 + k * w) }, size: { unit: 1, values: () => [w * 0.92] } } }),
          points: { show: false },
        });
      } else {
        data.push(xs.map((x) => (r.stats[x] && isNum(r.stats[x][spec.field]) ? r.stats[x][spec.field] : null)));
        series.push({ label: r.name, stroke: color, width: 2, spanGaps: true, points: { show: true, size: 7, fill: color }, value: (u, v) => fmtNum(v) });
      }
    });
    const opts = { series, ...lagAxisOpts(maxLag, spec.kind === "lagbars" ? (v) => `${fmtNum(v)} %` : null) };
    if (spec.kind === "lagbars") {
      opts.scales.y = { range: (u, min, max) => [0, Math.max(5, Math.min(100, max * 1.1))] };
      const summary = card(spec).querySelector(".hist-summary");
      summary.replaceChildren(...withData.map((r) => el("span", { "data-run": r.name, style: "display:block" }, el("b", { text: `${r.name}: ` }),
        Object.keys(r.counts).map(Number).sort((a, b) => a - b).map((lag) => `lag ${lag} · ${((100 * r.counts[lag]) / r.total).toFixed(0)} %`).join(", ") + ` (${r.total} samples)`)));
    }
    card(spec).querySelector(".note").textContent = missing.length ? `No staleness data from ${missing.join(", ")}.` : "";
    draw(spec, opts, data, "", `${spec.kind}:${maxLag}`);
  }

  function renderLiveChart(spec) {
    const live = state.live, hist = state.liveHistory;
    let series = [], data = null, empty = "Waiting for the first live sample…";
    if (spec.live === "queue") {
      const pts = hist.filter((h) => isNum(h.queue));
      if (live && live.redis && !live.redis.ok) empty = `No live source: Redis not reachable (${live.redis.error}).`;
      if (pts.length) {
        data = [pts.map((h) => h.t), pts.map((h) => h.queue)];
        series = [{ label: `run ${live.redis.run}`, stroke: cssVar("--accent"), width: 2, points: { show: pts.length < 3 } }];
      }
    } else {
      const urls = ((live && live.inference) || []).map((r) => r.url);
      if (!urls.length) empty = "No inference replicas configured (setting inference_urls).";
      const pts = hist.filter((h) => Object.keys(h.tps).length);
      if (urls.length && pts.length) {
        data = [pts.map((h) => h.t), ...urls.map((url) => pts.map((h) => h.tps[url] ?? null))];
        const pal = dark.matches ? PALETTE.dark : PALETTE.light;
        series = urls.map((url, i) => ({ label: url.replace(/^https?:\/\//, ""), stroke: pal[(i + 3) % pal.length], width: 2, spanGaps: true }));
      }
    }
    if (!data) return draw(spec, null, null, empty);
    const timeFmt = (v) => new Date(v * 1000).toLocaleTimeString();
    const ax = axes("time", null, "time");
    draw(spec, { series: [{ label: "time", value: (u, v) => (v == null ? "–" : timeFmt(v)) }, ...series.map((s) => ({ ...s, value: (u, v) => fmtNum(v) }))], axes: ax, scales: { x: { time: true } } }, data, "", "live");
  }

  // ---- run picker, facts, tiles, samples ---------------------------------------------------------
  function renderPicker() {
    const nav = $("#runs");
    nav.replaceChildren(...state.runs.map((r) => {
      const box = el("input", { type: "checkbox", value: r.name, "data-run": r.name });
      box.checked = state.selected.has(r.name);
      box.addEventListener("change", () => {
        state.touched = true;
        box.checked ? state.selected.add(r.name) : state.selected.delete(r.name);
        state.dirty = true;
        render();
        if (box.checked) fetchRun(r).then(render).catch(() => {});
      });
      return el("label", { class: "run-choice", "data-run": r.name }, box, el("span", { class: "swatch", style: `background:${runColor(r.name)}` }),
        el("span", { text: r.name }), el("span", { class: "pill", "data-status": r.status, text: r.status }));
    }));
    if (!state.runs.length) nav.replaceChildren(el("span", { class: "muted", text: "No runs found yet (waiting for a run directory with metrics.jsonl)…" }));
  }

  function lastValue(rows, key) {
    for (let i = rows.length - 1; i >= 0; i--) if (isNum(rows[i][key])) return rows[i][key];
    return null;
  }

  function renderFacts() {
    const runs = selectedRuns();
    const box = $("#fact-cards");
    if (!runs.length) return box.replaceChildren(el("p", { class: "empty-text", text: state.runs.length ? "Select a run above." : "Waiting for the first run…" }));
    box.replaceChildren(...runs.map((r) => {
      const d = state.data[r.name] || {}, rows = d.rows || [], cfg = d.config || {}, learner = cfg.learner || {};
      const acc = lastValue(rows, "accuracy") ?? (d.summary && d.summary.final_accuracy);
      const task = fmtTask(cfg.task) || r.task;
      const facts = [
        ["algorithm", r.algo || "–", "algo"], ["mode", r.mode || "–", "mode"], ["model", basename(r.model), "model"], ["task", task || "–", "task"],
        ["lag / max lag", r.lag ?? "–", "lag"], ["started", fmtTime(r.started_at), "started"], ["step", r.step ?? (rows.length ? rows.length : "–"), "step"],
        ["policy version", r.version ?? "–", "version"], ["rollouts consumed", r.rollouts != null ? r.rollouts.toLocaleString("en-US") : "–", "rollouts"],
        ["reward (last step)", fmtNum(lastValue(rows, "reward_mean")), "reward"], ["held-out accuracy", fmtNum(acc), "accuracy"],
        ["λ", fmtNum(lastValue(rows, "lam_next") ?? lastValue(rows, "lam")), "lam"], ["δ (budget)", learner.dual ? fmtNum(learner.dual.budget) : "–", "budget"],
      ];
      if (r.malformed_lines) facts.push(["skipped lines", r.malformed_lines, "malformed"]);
      if (r.source === "redis") facts.push(["source", "Redis metrics stream", "source"]);
      const dl = el("dl", {}, ...facts.flatMap(([k, v, f]) => [el("dt", { text: k }), el("dd", { "data-field": f, text: String(v) })]));
      if (r.model) dl.querySelector('[data-field="model"]').title = r.model;
      const details = Object.keys(cfg).length ? el("details", {}, el("summary", { text: "config.json" }), el("pre", { text: JSON.stringify(cfg, null, 1) })) : null;
      return el("article", { class: "fact-card", "data-run": r.name, style: `border-left-color:${runColor(r.name)}` },
        el("header", {}, el("h3", { text: r.name }), el("span", { class: "pill", "data-status": r.status, text: r.status })), dl, details);
    }));
  }

  function tile(label, value, field, error) {
    return [el("div", { class: `tile${error ? " error" : ""}`, "data-field": field }, el("dt", { text: label }), el("dd", { text: String(value) }))];
  }

  function renderTiles() {
    const redis = state.live && state.live.redis;
    const s = [], y = [];
    if (!redis) s.push(...tile("Redis", "waiting…", "redis"));
    else if (!redis.ok) {
      const msg = `not reachable (${redis.error})`;
      s.push(...tile("Redis: dead-lettered and dropped counts", msg, "redis", true));
      y.push(...tile("Redis: queue depth and learner state", msg, "redis", true));
    } else {
      const a = redis.accounting || {};
      s.push(...tile("dead-lettered groups", fmtNum(a.dead_lettered), "dead_lettered"), ...tile("dropped groups (Redis)", fmtNum(a.dropped), "dropped"),
        ...tile("trained groups", fmtNum(a.trained), "trained"), ...tile("unaccounted", fmtNum(a.unaccounted), "unaccounted"));
      y.push(...tile("queue depth", fmtNum(redis.queue_length), "queue"), ...tile("learner version (Redis)", redis.state.version ?? "–", "state_version"),
        ...tile("λ (Redis)", redis.state.lam != null ? fmtNum(Number(redis.state.lam)) : "–", "state_lam"),
        ...tile("latest weights", redis.weights ? `v${redis.weights.version}` : "–", "weights"));
    }
    for (const rep of (state.live && state.live.inference) || []) {
      const name = rep.url.replace(/^https?:\/\//, "");
      y.push(...tile(`replica ${name}`, rep.ok ? `v${rep.policy_version} · ${rep.tokens_per_s != null ? fmtNum(rep.tokens_per_s) + " tok/s" : "– tok/s"}` : `error: ${rep.error}`, "replica", !rep.ok));
    }
    $("#staleness-tiles").replaceChildren(...s);
    $("#system-tiles").replaceChildren(...y);
  }

  function renderSamples() {
    const body = $("#samples-table tbody");
    const trs = [];
    for (const r of selectedRuns()) {
      const rows = rowsOf(r.name).filter((row) => Array.isArray(row.samples_preview) && row.samples_preview.length).slice(-2).reverse();
      for (const row of rows) {
        for (const smp of row.samples_preview) {
          const cls = !isNum(smp.reward) ? "" : smp.reward > 0 ? "good" : smp.reward < 0 ? "bad" : "zero";
          trs.push(el("tr", { "data-run": r.name },
            el("td", {}, el("span", { class: "swatch", style: `background:${runColor(r.name)};margin-right:6px` }), r.name),
            el("td", { class: "num", text: String(row.step ?? row.batch ?? "–") }),
            el("td", {}, el("code", { text: String(smp.prompt ?? "") })), el("td", {}, el("code", { text: String(smp.completion ?? "") })),
            el("td", { class: `num ${cls}`, text: fmtNum(smp.reward) })));
        }
      }
    }
    body.replaceChildren(...trs);
    const empty = $("#samples-empty");
    empty.hidden = trs.length > 0;
    const any = selectedRuns().some((r) => rowsOf(r.name).length);
    empty.textContent = !selectedRuns().length ? "Select a run above." : any ? "These runs log no sample previews (samples_preview)." : "Waiting for the first step…";
  }

  function renderStatus() {
    const pill = $("#status");
    const runs = selectedRuns();
    let status = "waiting", text = "waiting for runs";
    if (state.failures) [status, text] = ["error", "disconnected"];
    else if (runs.some((r) => r.status === "live")) [status, text] = ["live", "live"];
    else if (runs.length && runs.every((r) => r.status === "finished")) [status, text] = ["finished", "finished"];
    else if (runs.some((r) => r.status === "idle")) [status, text] = ["idle", "idle (no new steps)"];
    else if (runs.length) text = "waiting for the first step";
    pill.dataset.status = status;
    pill.textContent = text;
  }

  function render() {
    state.dirty = false;
    renderStatus();
    renderPicker();
    renderFacts();
    renderTiles();
    for (const spec of CHARTS) {
      try {
        if (spec.kind === "lagbars" || spec.kind === "lag") renderLagChart(spec);
        else if (spec.kind === "live") renderLiveChart(spec);
        else renderRowsChart(spec);
      } catch (err) {
        console.warn(`chart ${spec.id}:`, err); // one broken chart must not blank the page
      }
    }
    renderSamples();
  }

  // ---- start -------------------------------------------------------------------------------------
  buildCards();
  $("#xaxis").addEventListener("change", (e) => {
    state.xaxis = e.target.value;
    render();
  });
  dark.addEventListener("change", () => render());
  window.r2vpoDashboard = { state }; // read-only hook for debugging in the console and for browser tests
  tick();
})();
