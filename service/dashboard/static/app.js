/* dpft dashboard: plain JavaScript on the public API (no build step, no dependencies).
 *
 * The API key lives in sessionStorage only and is sent as `Authorization: Bearer <key>`.
 * Pages poll the API: the job page asks `/v1/jobs/{id}/metrics?since_step=N` for the points it has
 * not seen yet, keeps them all, and draws at most ~2,000 of them (min/max per bucket), so a job
 * with 100,000 steps still draws quickly. Polling stops when the job ends.
 */
"use strict";

(() => {
  const KEY = "dpft.apiKey";
  const BASE = "/dashboard";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const MAX_BUCKETS = 1000; // min and max per bucket: at most ~2,000 drawn points per series
  const main = document.getElementById("main");

  // ---------------------------------------------------------------- DOM helpers (no innerHTML)

  function build(ns, tag, attrs, kids) {
    const el = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class" && !ns) el.className = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    append(el, kids);
    return el;
  }
  function append(el, kids) {
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const h = (tag, attrs, ...kids) => build(null, tag, attrs, kids);
  const s = (tag, attrs, ...kids) => build(SVGNS, tag, attrs, kids);
  const clear = (el) => { while (el.firstChild) el.removeChild(el.firstChild); return el; };

  // ---------------------------------------------------------------- formatting

  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const fmtInt = (n) => (n === null || n === undefined || !Number.isFinite(n) ? "—" : intFmt.format(n));
  const fmtEps = (e) => (e === null || e === undefined || !Number.isFinite(e) ? "—" : e.toFixed(2));
  const fmtDelta = (d) => (d === null || d === undefined ? "—" : d >= 0.01 ? String(d) : d.toExponential(2));
  const fmtNum = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toPrecision(digits));
  const timeFmt = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
  const clockFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const eventClockFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  const shortFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  const shortYearFmt = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric" });
  /** A <time> with a short local label ("Nov 23, 12:37 PM"; the year when it is not this one), full time on hover. */
  function timeEl(iso, fmt) {
    if (!iso) return h("span", { class: "muted", text: "—" });
    const d = new Date(iso);
    const label = fmt ? fmt.format(d) : d.getFullYear() === new Date().getFullYear() ? shortFmt.format(d) : shortYearFmt.format(d);
    return h("time", { datetime: iso, title: timeFmt.format(d), text: label });
  }
  function fmtDuration(ms) {
    if (!Number.isFinite(ms) || ms < 0) return "—";
    const sec = Math.round(ms / 1000);
    if (sec < 60) return `${sec} s`;
    const min = Math.floor(sec / 60);
    if (min < 60) return `${min} min ${sec % 60} s`;
    return `${Math.floor(min / 60)} h ${min % 60} min`;
  }
  function fmtBytes(n) {
    if (!Number.isFinite(n)) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }
  const pct = (a, b) => (b > 0 ? Math.max(0, Math.min(100, (100 * a) / b)) : 0);

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const getKey = () => sessionStorage.getItem(KEY);

  /** cache "no-cache" revalidates with If-None-Match: the API answers an unchanged poll with an empty 304. */
  async function api(path, { method = "GET", key = getKey(), cache = "no-store" } = {}) {
    let response;
    try {
      response = await fetch(path, {
        method,
        cache,
        headers: { Authorization: `Bearer ${key || ""}`, Accept: "application/json" },
      });
    } catch (err) {
      throw new ApiError(0, "network_error", "The API could not be reached.");
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) {
      const e = (body && body.error) || {};
      throw new ApiError(response.status, e.code || `http_${response.status}`, e.message || response.statusText);
    }
    return body;
  }

  async function apiBlob(path) {
    const response = await fetch(path, { headers: { Authorization: `Bearer ${getKey() || ""}` }, cache: "no-store" });
    if (!response.ok) throw new ApiError(response.status, `http_${response.status}`, response.statusText);
    return response.blob();
  }

  function goSignIn(reason) {
    sessionStorage.removeItem(KEY);
    const next = location.pathname + location.search;
    const q = new URLSearchParams({ next });
    if (reason) q.set("reason", reason);
    location.assign(`${BASE}/signin?${q}`);
  }

  /** Calls fn now and then again after each `interval` ms (or what fn returns); stops when fn returns false. */
  function poll(fn, interval) {
    let stopped = false;
    let timer = null;
    let failures = 0;
    const tick = async () => {
      if (stopped) return;
      let next = interval;
      try {
        const result = await fn();
        failures = 0;
        if (result === false) { stopped = true; return; }
        if (typeof result === "number") next = result;
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) { goSignIn("expired"); return; }
        failures += 1;
        next = Math.min(30000, interval * 2 ** failures);
        setLive("error", `Connection problem (${err.message}); retrying`);
      }
      if (!stopped) timer = setTimeout(tick, document.hidden ? Math.max(next, 5000) : next);
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }

  // ---------------------------------------------------------------- shared page parts

  let liveEl = null;
  function liveIndicator() {
    liveEl = h("p", { class: "live", id: "live", "aria-live": "off" },
      h("span", { class: "dot", "aria-hidden": "true" }), h("span", { class: "live-text", text: "Loading…" }));
    return liveEl;
  }
  function setLive(state, text) {
    if (!liveEl) return;
    liveEl.dataset.state = state;
    liveEl.querySelector(".live-text").textContent = text;
  }
  const updatedText = (prefix) => `${prefix} · updated ${clockFmt.format(new Date())}`;

  function statusBadge(status) {
    return h("span", { class: `badge st-${status}`, "data-status": status, text: status });
  }

  function bar(value, max, { label, cls = "", extraCls = "" } = {}) {
    const fill = h("span", { class: `fill ${cls}` });
    fill.style.width = `${pct(value, max)}%`;
    return h("span", {
      class: `bar ${extraCls}`, role: "progressbar", "aria-label": label,
      "aria-valuemin": 0, "aria-valuemax": Number((Number(max) || 0).toFixed(2)),
      "aria-valuenow": Number((Number(value) || 0).toFixed(2)),
    }, fill);
  }

  function header() {
    const who = document.getElementById("who");
    clear(who);
    const key = getKey();
    if (!key) return;
    who.append(
      h("span", { class: "key", title: "The API key of this browser session" }, "Key ", h("code", { text: `${key.slice(0, 10)}…` })),
      h("button", {
        type: "button", class: "btn btn-quiet", id: "signout",
        onclick: () => { sessionStorage.removeItem(KEY); location.assign(`${BASE}/signin`); },
      }, "Sign out"),
    );
  }

  function markNav(which) {
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === which) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  let datasetNames = new Map();
  async function loadDatasetNames() {
    const page = await api("/v1/datasets");
    datasetNames = new Map(page.data.map((d) => [d.id, d.name]));
    return page.data;
  }
  function datasetLink(id) {
    return h("a", { href: `${BASE}/datasets#${id}`, title: id, text: datasetNames.get(id) || id });
  }

  // ---------------------------------------------------------------- sign-in page

  function signInPage() {
    document.body.classList.add("signin-body");
    document.title = "Sign in · dpft";
    const params = new URLSearchParams(location.search);
    const error = h("p", { class: "form-error", id: "signin-error", role: "alert", "aria-live": "assertive" });
    const input = h("input", {
      id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
      required: true, placeholder: "dpft_…", "aria-describedby": "key-help signin-error",
    });
    const button = h("button", { type: "submit", class: "btn btn-primary", id: "signin-submit" }, "Sign in");
    if (params.get("reason") === "expired") {
      error.textContent = "Your API key was not accepted any more. Sign in again.";
    }
    const form = h("form", {
      class: "signin", novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        const key = input.value.trim();
        error.textContent = "";
        input.removeAttribute("aria-invalid");
        if (!key) {
          error.textContent = "Paste an API key first.";
          input.setAttribute("aria-invalid", "true");
          input.focus();
          return;
        }
        button.disabled = true;
        button.textContent = "Checking…";
        try {
          await api("/v1/jobs?limit=1", { key });
          sessionStorage.setItem(KEY, key);
          const next = params.get("next");
          location.assign(next && next.startsWith(`${BASE}/`) && !next.startsWith(`${BASE}/signin`) ? next : `${BASE}/`);
        } catch (err) {
          input.setAttribute("aria-invalid", "true");
          error.textContent = err.status === 401
            ? `This API key was not accepted (401 unauthorized): ${err.message}`
            : `Could not sign in: ${err.message}`;
          button.disabled = false;
          button.textContent = "Sign in";
          input.select();
        }
      },
    },
    h("h1", { text: "Sign in to dpft" }),
    h("p", { id: "key-help", class: "muted" },
      "Paste an API key (from ", h("code", { text: "dpft keys create" }), " or ", h("code", { text: "dpft up" }),
      "). It stays in this browser tab’s session storage only and is sent to this server as a bearer token."),
    h("label", { for: "api-key", text: "API key" }),
    input,
    error,
    button);
    append(clear(main), [h("div", { class: "signin-wrap" }, form)]);
    input.focus();
  }

  // ---------------------------------------------------------------- jobs page

  function jobsPage() {
    markNav("jobs");
    document.title = "Jobs · dpft";
    const params = new URLSearchParams(location.search);
    let status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
    let want = 50;
    let lastJson = "";

    const select = h("select", { id: "status-filter", name: "status" },
      h("option", { value: "", text: "All statuses" }),
      STATUSES.map((st) => h("option", { value: st, text: st })));
    select.value = status;
    const tbody = h("tbody", { id: "jobs-body" });
    const empty = h("p", { class: "empty", id: "jobs-empty", hidden: true });
    const more = h("button", { type: "button", class: "btn", hidden: true, onclick: () => { want += 50; refresh(); } }, "Show more");
    const table = h("table", { class: "jobs", id: "jobs-table" },
      h("caption", { class: "sr-only", text: "Your jobs, newest first" }),
      h("thead", {}, h("tr", {},
        ["Job", "Status", "Dataset", "Base model", "Progress (steps)", "ε spent of target", "Created", "Finished"]
          .map((t) => h("th", { scope: "col", text: t })))),
      tbody);

    append(clear(main), [
      h("div", { class: "page-head" },
        h("h1", { text: "Jobs" }),
        h("div", { class: "toolbar" },
          h("label", { for: "status-filter", text: "Status" }), select, liveIndicator())),
      h("div", { class: "table-wrap" }, table),
      empty, h("div", { class: "more" }, more),
    ]);

    let stop = null;
    select.addEventListener("change", () => {
      status = select.value;
      const q = new URLSearchParams(location.search);
      if (status) q.set("status", status); else q.delete("status");
      const qs = q.toString();
      history.replaceState(null, "", `${location.pathname}${qs ? `?${qs}` : ""}`);
      lastJson = "";
      refresh();
    });

    let namesAt = 0;
    async function fetchJobs() {
      const jobs = [];
      let after = null;
      let hasMore = false;
      while (jobs.length < want) {
        const q = new URLSearchParams({ limit: String(Math.min(100, want - jobs.length)) });
        if (status) q.set("status", status);
        if (after) q.set("after", after);
        const page = await api(`/v1/jobs?${q}`);
        jobs.push(...page.data);
        hasMore = page.has_more;
        if (!page.has_more || page.data.length === 0) break;
        after = page.data[page.data.length - 1].id;
      }
      return { jobs, hasMore };
    }

    async function tick() {
      if (Date.now() - namesAt > 30000) { await loadDatasetNames(); namesAt = Date.now(); }
      const { jobs, hasMore } = await fetchJobs();
      const active = jobs.some((j) => !TERMINAL.has(j.status));
      const json = JSON.stringify(jobs);
      if (json !== lastJson) {
        lastJson = json;
        render(jobs);
      }
      more.hidden = !hasMore;
      setLive(active ? "live" : "idle", updatedText(active ? "Live" : "No job running"));
      return active ? 2000 : 10000;
    }

    let rowsById = new Map(); // id -> {json, tr}: only rows whose job changed are rebuilt (keeps focus and hover)
    function render(jobs) {
      const unknownDataset = jobs.some((j) => !datasetNames.has(j.dataset_id));
      if (unknownDataset) namesAt = 0;
      const next = new Map();
      let before = null;
      for (let i = jobs.length - 1; i >= 0; i -= 1) {
        const job = jobs[i];
        const json = JSON.stringify(job) + (datasetNames.get(job.dataset_id) || "");
        const old = rowsById.get(job.id);
        const tr = old && old.json === json ? old.tr : jobRow(job);
        if (old && old.tr !== tr) old.tr.replaceWith(tr);
        if (tr.nextSibling !== before || tr.parentNode !== tbody) tbody.insertBefore(tr, before);
        next.set(job.id, { json, tr });
        before = tr;
      }
      for (const [id, { tr }] of rowsById) if (!next.has(id)) tr.remove();
      rowsById = next;
      empty.hidden = jobs.length > 0;
      empty.textContent = status
        ? `No ${status} jobs.`
        : "No jobs yet. Create one with POST /v1/jobs, the Python client or the dpft CLI.";
      table.hidden = jobs.length === 0;
    }

    function refresh() {
      if (stop) stop();
      stop = poll(tick, 2000);
    }
    refresh();
  }

  function jobRow(job) {
    const target = job.target_epsilon ?? job.plan.epsilon;
    const targetLabel = job.target_epsilon != null ? "target" : "planned";
    return h("tr", { "data-job-id": job.id, "data-status": job.status },
      h("td", {}, h("a", { href: `${BASE}/jobs/${encodeURIComponent(job.id)}`, class: "mono", text: job.id })),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, datasetLink(job.dataset_id)),
      h("td", { class: "mono small", text: job.base_model }),
      h("td", { class: "cell-progress" },
        h("span", { class: "num", text: `${fmtInt(job.step)} / ${fmtInt(job.total_steps)}` }),
        bar(job.step, job.total_steps, { label: `Steps done of ${fmtInt(job.total_steps)}`, cls: "fill-steps" })),
      h("td", { class: "cell-eps" },
        h("span", { class: "num" }, h("strong", { class: "eps", text: fmtEps(job.epsilon) }), ` of ${fmtEps(target)}`),
        bar(job.epsilon, target, { label: `Epsilon spent of ${targetLabel} ${fmtEps(target)}`, cls: "fill-eps" })),
      h("td", { class: "small" }, timeEl(job.created_at)),
      h("td", { class: "small" }, timeEl(job.finished_at)));
  }

  // ---------------------------------------------------------------- charts (hand-written SVG)

  /** Nice round tick values covering [lo, hi]. */
  function ticks(lo, hi, count) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const raw = span / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / mag;
    const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const t = ticks(0, v, 5);
    const step = t.length > 1 ? t[1] - t[0] : v;
    return Math.ceil(v / step - 1e-9) * step;
  }

  /** Indices of the points to draw: all of them, or the first/min/max/last of each of ~MAX_BUCKETS buckets. */
  function downsample(xs, ys, maxBuckets = MAX_BUCKETS) {
    const n = xs.length;
    if (n <= maxBuckets * 2) return { xs, ys };
    const ox = [];
    const oy = [];
    const size = n / maxBuckets;
    for (let b = 0; b < maxBuckets; b += 1) {
      const start = Math.floor(b * size);
      const end = Math.min(n, Math.floor((b + 1) * size));
      let lo = start;
      let hi = start;
      for (let i = start + 1; i < end; i += 1) {
        if (ys[i] < ys[lo]) lo = i;
        if (ys[i] > ys[hi]) hi = i;
      }
      const [a, c] = lo <= hi ? [lo, hi] : [hi, lo];
      ox.push(xs[a]); oy.push(ys[a]);
      if (c !== a) { ox.push(xs[c]); oy.push(ys[c]); }
    }
    if (ox[ox.length - 1] !== xs[n - 1]) { ox.push(xs[n - 1]); oy.push(ys[n - 1]); }
    return { xs: ox, ys: oy };
  }

  class LineChart {
    constructor({ id, title, yLabel, yFormat }) {
      this.W = 720; this.H = 260;
      this.m = { l: 56, r: 16, t: 12, b: 38 };
      this.yFormat = yFormat;
      this.grid = s("g", { class: "grid" });
      this.axes = s("g", { class: "axes" });
      this.lines = s("g", { class: "lines" });
      this.hover = s("g", { class: "hover", visibility: "hidden" },
        s("line", { class: "hover-line", y1: this.m.t, y2: this.H - this.m.b }));
      this.svg = s("svg", {
        viewBox: `0 0 ${this.W} ${this.H}`, role: "img", "aria-label": title, class: "chart", id,
        preserveAspectRatio: "none",
      },
      s("title", {}, title), this.grid, this.axes, this.lines, this.hover,
      s("text", { class: "axis-label", x: this.W / 2 + this.m.l / 2, y: this.H - 4, "text-anchor": "middle" }, "step"),
      s("text", { class: "axis-label", transform: `translate(13 ${(this.H - this.m.b) / 2}) rotate(-90)`, "text-anchor": "middle" }, yLabel));
      this.paths = new Map();
      this.tip = h("div", { class: "chart-tip", hidden: true, "aria-hidden": "true" });
      this.el = h("div", { class: "chart-box" }, this.svg, this.tip);
      this.svg.addEventListener("pointermove", (e) => this.onHover(e));
      this.svg.addEventListener("pointerleave", () => { this.hover.setAttribute("visibility", "hidden"); this.tip.hidden = true; });
      this.hoverSource = null;
    }

    x(v) { return this.m.l + ((v - this.x0) / (this.x1 - this.x0 || 1)) * (this.W - this.m.l - this.m.r); }
    y(v) { return this.H - this.m.b - ((v - this.y0) / (this.y1 - this.y0 || 1)) * (this.H - this.m.t - this.m.b); }

    path(name, cls) {
      if (!this.paths.has(name)) {
        const p = s("path", { class: `series ${cls}`, fill: "none", "vector-effect": "non-scaling-stroke" });
        this.lines.append(p);
        this.paths.set(name, p);
      }
      return this.paths.get(name);
    }

    /** domain: {x0,x1,y0,y1}; series: [{name, cls, xs, ys}]; hlines: [{name, cls, y, label}] */
    draw(domain, series, hlines = []) {
      Object.assign(this, domain);
      clear(this.grid); clear(this.axes);
      const xt = ticks(this.x0, this.x1, 6);
      const yt = ticks(this.y0, this.y1, 5);
      for (const v of yt) {
        const yy = this.y(v).toFixed(1);
        this.grid.append(s("line", { x1: this.m.l, x2: this.W - this.m.r, y1: yy, y2: yy }));
        this.axes.append(s("text", { x: this.m.l - 6, y: yy, dy: "0.32em", "text-anchor": "end" }, this.yFormat(v, yt)));
      }
      for (const v of xt) {
        const xx = this.x(v).toFixed(1);
        this.grid.append(s("line", { class: "v", x1: xx, x2: xx, y1: this.m.t, y2: this.H - this.m.b }));
        this.axes.append(s("text", { x: xx, y: this.H - this.m.b + 16, "text-anchor": "middle" }, fmtInt(v)));
      }
      this.axes.append(s("line", { class: "axis", x1: this.m.l, x2: this.W - this.m.r, y1: this.H - this.m.b, y2: this.H - this.m.b }));
      for (const se of series) {
        const p = this.path(se.name, se.cls);
        const ds = downsample(se.xs, se.ys);
        let d = "";
        for (let i = 0; i < ds.xs.length; i += 1) {
          d += `${i ? "L" : "M"}${this.x(ds.xs[i]).toFixed(1)},${this.y(ds.ys[i]).toFixed(1)}`;
        }
        p.setAttribute("d", d);
        p.setAttribute("data-drawn", String(ds.xs.length));
      }
      for (const hl of hlines) {
        const p = this.path(hl.name, hl.cls);
        const yy = this.y(hl.y).toFixed(1);
        p.setAttribute("d", `M${this.m.l},${yy}L${this.W - this.m.r},${yy}`);
      }
    }

    onHover(event) {
      const src = this.hoverSource && this.hoverSource();
      if (!src || !src.xs.length || this.x1 === undefined) return;
      const rect = this.svg.getBoundingClientRect();
      const vx = ((event.clientX - rect.left) / rect.width) * this.W;
      const step = this.x0 + ((vx - this.m.l) / (this.W - this.m.l - this.m.r)) * (this.x1 - this.x0);
      let lo = 0; let hi = src.xs.length - 1;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (src.xs[mid] < step) lo = mid + 1; else hi = mid; }
      if (lo > 0 && Math.abs(src.xs[lo - 1] - step) < Math.abs(src.xs[lo] - step)) lo -= 1;
      const xx = this.x(src.xs[lo]);
      const line = this.hover.firstChild;
      line.setAttribute("x1", xx.toFixed(1)); line.setAttribute("x2", xx.toFixed(1));
      this.hover.setAttribute("visibility", "visible");
      this.tip.textContent = src.label(lo);
      this.tip.hidden = false;
      const left = (xx / this.W) * rect.width;
      this.tip.style.left = `${Math.min(rect.width - 150, Math.max(0, left + 10))}px`;
    }
  }

  function legendItem(cls, text) {
    return h("li", {}, h("span", { class: `key-swatch ${cls}`, "aria-hidden": "true" }), text);
  }

  // ---------------------------------------------------------------- job page

  function jobPage(jobId) {
    markNav("jobs");
    document.title = `Job ${jobId} · dpft`;
    const m = { steps: [], eps: [], lossSteps: [], loss: [] };
    let job = null;
    let since = 0;
    let eventsAfter = 0;
    let ticksDone = 0;
    let artifactsLoaded = false;
    let finalFetchDone = false;

    // Skeleton with fixed sizes: values fill in without moving anything.
    const el = {
      status: h("span", { class: "badge", text: "…" }),
      cancel: h("button", { type: "button", class: "btn btn-danger", id: "cancel-job", disabled: true }, "Cancel job"),
      cancelMsg: h("span", { class: "small muted", role: "status", id: "cancel-msg" }),
      eps: h("span", { class: "big num", id: "eps-value", "data-testid": "epsilon", text: "—" }),
      epsOf: h("span", { class: "muted", id: "eps-target", text: "" }),
      epsBar: h("span", { class: "bar-slot" }),
      steps: h("span", { class: "big num", id: "step-value", text: "—" }),
      stepsOf: h("span", { class: "muted", text: "" }),
      stepsBar: h("span", { class: "bar-slot" }),
      delta: h("span", { class: "big num", id: "delta-value", text: "—" }),
      deltaNote: h("span", { class: "muted", text: "" }),
      timing: h("span", { class: "big num", text: "—" }),
      timingNote: h("span", { class: "muted", text: "" }),
      meta: h("p", { class: "job-meta muted" }),
      error: h("div", { class: "error-box", role: "alert", hidden: true }),
      plan: h("dl", { class: "plan", id: "plan" }),
      events: h("ol", { class: "events", id: "events", "aria-live": "polite", "aria-relevant": "additions" }),
      artifacts: h("ul", { class: "artifacts", id: "artifacts" }, h("li", { class: "muted", text: "Available when the job has finished." })),
      lossNote: h("p", { class: "note small" }),
    };
    const epsChart = new LineChart({
      id: "eps-chart-svg", title: "Privacy spent: epsilon against step (actual, planned, target)",
      yLabel: "ε", yFormat: (v, t) => v.toFixed(t.length > 1 && t[1] - t[0] < 0.1 ? 2 : 1),
    });
    const lossChart = new LineChart({
      id: "loss-chart-svg", title: "Training loss against step (not covered by the DP guarantee)",
      yLabel: "loss", yFormat: (v, t) => v.toFixed(t.length > 1 && t[1] - t[0] < 0.1 ? 2 : 1),
    });
    epsChart.hoverSource = () => ({
      xs: m.steps, label: (i) => `step ${fmtInt(m.steps[i])} · ε ${fmtEps(m.eps[i])}`,
    });
    lossChart.hoverSource = () => ({
      xs: m.lossSteps, label: (i) => `step ${fmtInt(m.lossSteps[i])} · loss ${m.loss[i].toFixed(3)}`,
    });
    const epsFigure = h("figure", { class: "chart-fig", id: "eps-chart", "data-points": "0" },
      h("figcaption", {}, h("h2", { text: "Privacy spent (ε) per step" }),
        h("ul", { class: "legend", "aria-label": "Legend" },
          legendItem("sw-actual", "actual ε"), legendItem("sw-plan", "planned (noise solver)"), legendItem("sw-target", "target ε"))),
      epsChart.el);
    const lossFigure = h("figure", { class: "chart-fig", id: "loss-chart", "data-points": "0" },
      h("figcaption", {}, h("h2", {}, "Training loss ", h("span", { class: "tag-warn", text: "not covered by DP" })),
        h("ul", { class: "legend", "aria-label": "Legend" }, legendItem("sw-loss", "loss on private batches"))),
      lossChart.el, el.lossNote);
    el.lossNote.textContent = "The loss is computed on private training batches outside DP-SGD: it is not covered by the privacy guarantee. Do not share it as if it were.";

    el.cancel.addEventListener("click", async () => {
      if (!job || !window.confirm(`Cancel job ${job.id}? Epsilon already spent stays spent.`)) return;
      el.cancel.disabled = true;
      el.cancelMsg.textContent = "Cancelling…";
      try {
        job = await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
        el.cancelMsg.textContent = "Cancel requested.";
        renderJob();
      } catch (err) {
        el.cancelMsg.textContent = `Could not cancel: ${err.message}`;
      }
    });

    const card = (label, ...kids) => h("div", { class: "stat" }, h("span", { class: "stat-label", text: label }), kids);
    append(clear(main), [
      h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: `${BASE}/`, text: "Jobs" }), " › ", h("span", { class: "mono", text: jobId })),
      h("div", { class: "page-head" },
        h("h1", {}, "Job ", h("span", { class: "mono", text: jobId })), el.status,
        h("div", { class: "toolbar" }, liveIndicator(), el.cancelMsg, el.cancel)),
      el.meta,
      el.error,
      h("section", { class: "stats", "aria-label": "Summary" },
        card("ε spent", el.eps, el.epsOf, el.epsBar),
        card("Steps", el.steps, el.stepsOf, el.stepsBar),
        card("δ", el.delta, el.deltaNote),
        card("Time", el.timing, el.timingNote)),
      h("div", { class: "job-grid" },
        h("div", { class: "charts" }, epsFigure, lossFigure),
        h("aside", { class: "side" },
          h("section", { class: "panel", "aria-labelledby": "plan-h" }, h("h2", { id: "plan-h", text: "Plan" }), el.plan),
          h("section", { class: "panel", "aria-labelledby": "art-h" }, h("h2", { id: "art-h", text: "Artifacts" }), el.artifacts),
          h("section", { class: "panel", "aria-labelledby": "ev-h" }, h("h2", { id: "ev-h", text: "Event log" }),
            h("div", { class: "events-box", tabindex: "0", "aria-label": "Event log" }, el.events)))),
    ]);

    function notFound(err) {
      document.title = "Job not found · dpft";
      append(clear(main), [
        h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: `${BASE}/`, text: "Jobs" })),
        h("div", { class: "notfound", role: "alert", id: "not-found" },
          h("h1", { text: "Job not found" }),
          h("p", {}, "No job ", h("code", { text: jobId }), " is visible with this API key. It may not exist, or it may belong to another tenant."),
          h("p", { class: "small muted", text: `The API said: ${err.code}: ${err.message}` }),
          h("p", {}, h("a", { href: `${BASE}/`, text: "Back to your jobs" }))),
      ]);
    }

    async function fetchMetrics() {
      for (let guard = 0; guard < 200; guard += 1) {
        const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/metrics?since_step=${since}&limit=10000`, {
          cache: "no-cache",
        });
        for (const p of page.data) {
          m.steps.push(p.step); m.eps.push(p.epsilon);
          if (p.loss !== null && Number.isFinite(p.loss)) { m.lossSteps.push(p.step); m.loss.push(p.loss); }
        }
        if (page.note) el.lossNote.textContent = `Not covered by DP: ${page.note}.`;
        since = page.next_since_step;
        if (!page.has_more) break;
      }
    }

    async function fetchEvents() {
      const page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/events?after=${eventsAfter}&limit=1000`);
      for (const ev of page.data) {
        eventsAfter = Math.max(eventsAfter, ev.id);
        el.events.append(h("li", { "data-type": ev.type },
          h("span", { class: "ev-time small muted" }, timeEl(ev.created_at, eventClockFmt)),
          h("span", { class: `ev-type ev-${ev.type}`, text: ev.type }),
          h("span", { class: "ev-msg", text: ev.message })));
      }
      if (!eventsAfter && !el.events.firstChild) el.events.append(h("li", { class: "muted ev-none", text: "No events yet." }));
      if (page.data.length) {
        const none = el.events.querySelector(".ev-none");
        if (none) none.remove();
        const box = el.events.parentElement;
        box.scrollTop = box.scrollHeight;
      }
    }

    async function fetchArtifacts() {
      let page;
      try {
        page = await api(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts`);
      } catch (err) {
        if (err.status === 401) throw err;
        clear(el.artifacts).append(h("li", { class: "muted", text: "No artifacts listed by this server." }));
        return;
      }
      clear(el.artifacts);
      if (!page.data.length) el.artifacts.append(h("li", { class: "muted", text: "This job produced no artifacts." }));
      for (const a of page.data) {
        const path = `/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${a.name.split("/").map(encodeURIComponent).join("/")}`;
        const btn = h("button", { type: "button", class: "btn btn-small", "aria-label": `Download ${a.name}` }, "Download");
        btn.addEventListener("click", async () => {
          btn.disabled = true;
          try {
            const blob = await apiBlob(path);
            const url = URL.createObjectURL(blob);
            const link = h("a", { href: url, download: a.name.split("/").pop() });
            document.body.append(link); link.click(); link.remove();
            setTimeout(() => URL.revokeObjectURL(url), 10000);
          } catch (err) {
            btn.textContent = `Failed (${err.status || err.message})`;
          } finally {
            btn.disabled = false;
          }
        });
        el.artifacts.append(h("li", {}, h("span", { class: "mono small art-name", text: a.name }),
          h("span", { class: "small muted", text: fmtBytes(a.size_bytes) }), btn));
      }
    }

    function renderPlan() {
      const p = job.plan;
      const pr = job.privacy || {};
      const hp = job.hyperparameters || {};
      const rows = [
        ["Noise multiplier (σ)", fmtNum(p.noise_multiplier, 4)],
        ["Sampling probability (q)", fmtNum(p.sampling_probability, 3)],
        ["Planned steps", fmtInt(p.steps)],
        ["Planned ε", fmtEps(p.epsilon)],
        ["Target ε", job.target_epsilon != null ? fmtEps(job.target_epsilon) : "none (fixed noise)"],
        ["δ", fmtDelta(p.delta)],
        ["Accountant", `${p.accountant}${p.fell_back ? " (PRV failed; fell back to RDP)" : ""}`],
        ["Clip norm (C)", pr.max_grad_norm != null ? String(pr.max_grad_norm) : "—"],
        ["Privacy unit", pr.unit === "entity" ? `entity (${pr.entity_column})` : (pr.unit || "record")],
        ["Privacy units (N)", fmtInt(p.num_units)],
        ["Clipping", pr.clipping || "flat"],
        ["Batch size (expected)", fmtInt(hp.batch_size)],
        ["Learning rate", hp.learning_rate != null ? String(hp.learning_rate) : "—"],
        ["LoRA", job.lora ? `r ${job.lora.r}, α ${job.lora.alpha}` : "full fine-tuning"],
      ];
      clear(el.plan);
      for (const [k, v] of rows) el.plan.append(h("div", {}, h("dt", { text: k }), h("dd", { class: "num", text: v })));
    }

    function runningNote(start) {
      if (!(job.step > 0) || job.step >= job.total_steps) return job.status;
      const left = ((Date.now() - start) / job.step) * (job.total_steps - job.step);
      return `${job.status} · about ${fmtDuration(left)} left`;
    }

    function renderJob() {
      const terminal = TERMINAL.has(job.status);
      el.status.replaceWith(el.status = statusBadge(job.status));
      el.status.id = "job-status";
      el.cancel.disabled = !(job.status === "queued" || job.status === "running");
      el.cancel.hidden = terminal;
      const target = job.target_epsilon ?? job.plan.epsilon;
      el.eps.textContent = fmtEps(job.epsilon);
      el.epsOf.textContent = job.target_epsilon != null ? `of target ${fmtEps(job.target_epsilon)}` : `of planned ${fmtEps(job.plan.epsilon)}`;
      clear(el.epsBar).append(bar(job.epsilon, target, { label: "Epsilon spent of target", cls: "fill-eps" }));
      el.steps.textContent = fmtInt(job.step);
      el.stepsOf.textContent = `of ${fmtInt(job.total_steps)}`;
      clear(el.stepsBar).append(bar(job.step, job.total_steps, { label: "Steps done", cls: "fill-steps" }));
      el.delta.textContent = fmtDelta(job.plan.delta);
      el.deltaNote.textContent = `${job.plan.accountant.toUpperCase()} accountant`;
      const start = job.started_at ? Date.parse(job.started_at) : null;
      const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
      el.timing.textContent = start ? fmtDuration(end - start) : "—";
      el.timingNote.textContent = terminal
        ? `finished ${job.finished_at ? shortFmt.format(new Date(job.finished_at)) : ""}`
        : start ? runningNote(start) : `queued since ${clockFmt.format(new Date(job.created_at))}`;
      clear(el.meta);
      append(el.meta, [
        h("span", {}, "Dataset ", datasetLink(job.dataset_id)), " · ",
        h("span", {}, "Model ", h("code", { text: job.base_model })), " · ",
        h("span", { text: `Task ${job.task}` }), " · ",
        h("span", {}, "Created ", timeEl(job.created_at)),
        job.stop_reason ? [" · ", h("span", { text: `Stopped: ${job.stop_reason}` })] : null,
        job.attempt > 1 ? [" · ", h("span", { text: `Attempt ${job.attempt}` })] : null,
      ]);
      el.error.hidden = !job.error;
      el.error.textContent = job.error ? `Failed: ${job.error}` : "";
      renderPlan();
    }

    function renderCharts() {
      const t0 = performance.now();
      const x1 = Math.max(job.total_steps, job.plan.steps || 0, m.steps.length ? m.steps[m.steps.length - 1] : 0, 1);
      const plan = (job.plan.curve || []).filter((pt) => Array.isArray(pt));
      // The solver's curve is sampled (≤ ~200 points); it is drawn from its first point, since a straight
      // segment from (0, 0) would misstate the steep start of a concave epsilon curve.
      const planXs = plan.map((pt) => pt[0]);
      const planYs = plan.map((pt) => pt[1]);
      const maxEps = Math.max(job.target_epsilon || 0, job.plan.epsilon || 0, m.eps.length ? m.eps[m.eps.length - 1] : 0, ...planYs, 0);
      epsChart.draw({ x0: 0, x1, y0: 0, y1: niceMax(maxEps * 1.05) }, [
        { name: "plan", cls: "s-plan", xs: planXs, ys: planYs },
        { name: "actual", cls: "s-actual", xs: [0, ...m.steps], ys: [0, ...m.eps] },
      ], job.target_epsilon != null ? [{ name: "target", cls: "s-target", y: job.target_epsilon }] : []);
      epsFigure.dataset.points = String(m.steps.length);
      epsChart.svg.setAttribute("aria-label", m.steps.length
        ? `Privacy spent: epsilon ${fmtEps(m.eps[m.eps.length - 1])} after step ${fmtInt(m.steps[m.steps.length - 1])} of ${fmtInt(job.total_steps)}; planned ${fmtEps(job.plan.epsilon)}${job.target_epsilon != null ? `, target ${fmtEps(job.target_epsilon)}` : ""}`
        : `Privacy spent: no steps yet; planned epsilon ${fmtEps(job.plan.epsilon)} over ${fmtInt(job.plan.steps)} steps`);
      epsFigure.dataset.lastEpsilon = m.eps.length ? String(m.eps[m.eps.length - 1]) : "";

      let lo = Infinity; let hi = -Infinity;
      for (const v of m.loss) { if (v < lo) lo = v; if (v > hi) hi = v; }
      if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
      const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
      const yt = ticks(lo - pad, hi + pad, 5);
      const step = yt.length > 1 ? yt[1] - yt[0] : pad;
      lossChart.draw({ x0: 0, x1, y0: Math.floor((lo - pad) / step) * step, y1: Math.ceil((hi + pad) / step) * step },
        [{ name: "loss", cls: "s-loss", xs: m.lossSteps, ys: m.loss }]);
      lossFigure.dataset.points = String(m.lossSteps.length);
      epsFigure.dataset.renderMs = (performance.now() - t0).toFixed(1); // both charts, for the tests
    }

    async function tick() {
      try {
        job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
      } catch (err) {
        if (err.status === 404) { notFound(err); return false; }
        throw err;
      }
      if (!datasetNames.has(job.dataset_id) && ticksDone % 30 === 0) {
        try { await loadDatasetNames(); } catch (err) { if (err.status === 401) throw err; }
      }
      await fetchMetrics();
      if (ticksDone % 2 === 0 || TERMINAL.has(job.status)) await fetchEvents();
      ticksDone += 1;
      renderJob();
      renderCharts();
      if (TERMINAL.has(job.status)) {
        // One more round after the end so that the last flushed points and events are in.
        if (!finalFetchDone) { finalFetchDone = true; return 1000; }
        if (!artifactsLoaded) { artifactsLoaded = true; await fetchArtifacts(); }
        setLive("idle", `Job ${job.status} · not polling`);
        main.dataset.final = "true";
        return false;
      }
      setLive("live", updatedText(job.status === "queued" ? "Waiting for a worker" : "Live"));
      return 1000;
    }
    poll(tick, 1000);
  }

  // ---------------------------------------------------------------- datasets page

  function datasetsPage() {
    markNav("datasets");
    document.title = "Datasets · dpft";
    const list = h("div", { class: "datasets", id: "datasets" });
    const empty = h("p", { class: "empty", hidden: true, text: "No datasets yet. Upload one with POST /v1/datasets or the dpft CLI." });
    append(clear(main), [
      h("div", { class: "page-head" }, h("h1", { text: "Datasets" }), h("div", { class: "toolbar" }, liveIndicator())),
      h("p", { class: "muted intro" },
        "Each dataset’s privacy budget, what each job spent or holds reserved of it (basic composition: the ε of the jobs add up), and what is left."),
      list, empty,
    ]);
    let lastJson = "";
    let ledgerSupported = true;

    async function ledgerFor(ds) {
      if (ledgerSupported) {
        try {
          const page = await api(`/v1/datasets/${encodeURIComponent(ds.id)}/ledger`);
          return { entries: page.data, derived: false };
        } catch (err) {
          if (err.status !== 404 && err.status !== 405) throw err;
          ledgerSupported = false;
        }
      }
      // Fallback while the server has no ledger endpoint: the dataset's jobs.
      const page = await api(`/v1/jobs?dataset_id=${encodeURIComponent(ds.id)}&limit=100`);
      return {
        derived: true,
        entries: page.data.filter((j) => j.status !== "cancelled" || j.step > 0).map((j) => ({
          job_id: j.id,
          epsilon: TERMINAL.has(j.status) ? j.epsilon : (j.target_epsilon ?? j.plan.epsilon),
          delta: j.plan.delta,
          state: TERMINAL.has(j.status) ? "spent" : "reserved",
          created_at: j.created_at,
        })),
      };
    }

    async function tick() {
      const datasets = await loadDatasetNames();
      const all = await Promise.all(datasets.map(async (ds) => ({ ds, ...(await ledgerFor(ds)) })));
      const json = JSON.stringify(all);
      if (json !== lastJson) {
        lastJson = json;
        clear(list);
        for (const item of all) list.append(datasetCard(item));
        empty.hidden = datasets.length > 0;
        if (location.hash) {
          const target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
          if (target && !target.dataset.scrolled) { target.dataset.scrolled = "1"; target.scrollIntoView(); target.classList.add("flash"); }
        }
      }
      const active = all.some((x) => x.entries.some((e) => e.state === "reserved"));
      setLive(active ? "live" : "idle", updatedText(active ? "Live" : "Up to date"));
      return active ? 2000 : 10000;
    }
    poll(tick, 2000);
  }

  function datasetCard({ ds, entries, derived }) {
    const spent = entries.filter((e) => e.state === "spent").reduce((a, e) => a + e.epsilon, 0);
    const reserved = entries.filter((e) => e.state !== "spent").reduce((a, e) => a + e.epsilon, 0);
    const used = derived ? spent + reserved : Math.max(ds.epsilon_spent, spent + reserved);
    const budget = ds.epsilon_budget;
    const scale = budget != null ? Math.max(budget, used) : Math.max(used, 1e-9);
    const segs = h("div", { class: "budget-bar", role: "img",
      "aria-label": budget != null
        ? `ε budget ${fmtEps(budget)}: ${fmtEps(spent)} spent, ${fmtEps(reserved)} reserved, ${fmtEps(Math.max(0, budget - used))} left`
        : `No ε budget; ${fmtEps(used)} spent or reserved` });
    entries.forEach((e, i) => {
      const seg = h("span", { class: `seg ${e.state === "spent" ? "seg-spent" : "seg-reserved"} c${i % 6}`,
        title: `${e.job_id}: ε ${fmtEps(e.epsilon)} ${e.state}` });
      seg.style.width = `${pct(e.epsilon, scale)}%`;
      segs.append(seg);
    });
    const left = budget != null ? budget - used : null;
    const num = (label, value, cls = "") => h("div", { class: `ds-num ${cls}` }, h("span", { class: "stat-label", text: label }), h("span", { class: "big num", text: value }));
    const rows = entries.map((e, i) => h("tr", {},
      h("td", {}, h("span", { class: `key-swatch seg-${e.state === "spent" ? "spent" : "reserved"} c${i % 6}`, "aria-hidden": "true" }),
        h("a", { class: "mono", href: `${BASE}/jobs/${encodeURIComponent(e.job_id)}`, text: e.job_id })),
      h("td", {}, h("span", { class: `badge st-${e.state}`, text: e.state })),
      h("td", { class: "num r", text: fmtEps(e.epsilon) }),
      h("td", { class: "num r", text: fmtDelta(e.delta) }),
      h("td", { class: "small" }, timeEl(e.updated_at || e.created_at))));
    return h("section", { class: "panel ds-card", id: ds.id, "aria-labelledby": `${ds.id}-h`, "data-dataset-id": ds.id },
      h("div", { class: "ds-head" },
        h("h2", { id: `${ds.id}-h`, text: ds.name }),
        h("span", { class: "mono small muted", text: ds.id }),
        h("span", { class: "small muted", text: `${fmtInt(ds.num_records)} records${ds.num_entities != null ? ` · ${fmtInt(ds.num_entities)} entities` : ""} · ${fmtBytes(ds.size_bytes)} · ${ds.format}` })),
      h("div", { class: "ds-nums" },
        num("ε budget", budget != null ? fmtEps(budget) : "none"),
        num("spent", fmtEps(spent)),
        num("reserved", fmtEps(reserved)),
        num("left", left != null ? fmtEps(Math.max(0, left)) : "—", left != null && left <= 0 ? "over" : "ds-left"),
        num("δ budget", ds.delta_budget != null ? fmtDelta(ds.delta_budget) : "none")),
      segs,
      budget == null ? h("p", { class: "small muted", text: "No ε budget is set on this dataset: each job is limited by its own target only." }) : null,
      entries.length
        ? h("table", { class: "ledger" },
          h("caption", { class: "sr-only", text: `Privacy spend of each job on ${ds.name}` }),
          h("thead", {}, h("tr", {}, ["Job", "State", "ε", "δ", "Updated"].map((t, i) => h("th", { scope: "col", class: i === 2 || i === 3 ? "r" : null, text: t })))),
          h("tbody", {}, rows))
        : h("p", { class: "small muted", text: "No job has used this dataset yet." }),
      derived ? h("p", { class: "small muted", text: "Derived from the dataset’s jobs (this server has no ledger endpoint)." }) : null);
  }

  // ---------------------------------------------------------------- router

  function route() {
    const path = location.pathname.replace(/\/+$/, "");
    if (path === `${BASE}/signin`) { signInPage(); return; }
    if (!getKey()) { goSignIn(); return; }
    header();
    const job = path.match(/^\/dashboard\/jobs\/([^/]+)$/);
    if (job) jobPage(decodeURIComponent(job[1]));
    else if (path === `${BASE}/datasets`) datasetsPage();
    else jobsPage();
  }

  // Exposed for the browser tests and for people poking around in the console.
  window.dpftDashboard = { downsample, ticks };
  route();
})();
