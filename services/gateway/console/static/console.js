// The Cloud-ML console: a hash-routed page over /ui/api/ (services/gateway/console/api.py).
// Every value from the platform is tenant data: it goes into the page as text
// (textContent), never as HTML.
"use strict";

const state = {session: null, tenant: "", timer: null, abort: null, rates: {}};
const TERMINAL = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);

function el(tag, attrs, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "onclick" || k === "onchange" || k === "oninput" || k === "onsubmit") n[k] = v;
    else if (k === "class") n.className = v;
    else n.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    n.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return n;
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function short(enumName, prefix) { return (enumName || "").replace(prefix, ""); }

function age(ts) {
  if (!ts) return "";
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 90) return `${Math.round(s)}s`;
  if (s < 5400) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

function bytes(n) {
  n = Number(n || 0);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${Number(n.toPrecision(3))} ${units[i]}`;
}

function cpu(millis) { return `${Number(millis || 0) / 1000}`; }

function tenantQuery(extra) {
  const q = new URLSearchParams(extra || {});
  if (state.tenant && state.session && state.tenant !== state.session.tenant) q.set("tenant", state.tenant);
  const s = q.toString();
  return s ? `?${s}` : "";
}

async function api(path, opts = {}) {
  const init = {credentials: "same-origin", headers: {}, signal: opts.signal};
  if (opts.method === "POST") {
    init.method = "POST";
    init.headers["X-CSRF-Token"] = state.session ? state.session.csrf : "";
    if (opts.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = opts.body;
    }
  }
  const response = await fetch(`/ui/api/${path}${opts.raw ? "" : tenantQuery(opts.query)}`, init);
  if (response.status === 401) { location.reload(); throw new Error("not logged in"); }
  if (opts.stream) return response;
  const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok && !opts.keepErrors) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.textContent = "";
  for (const n of nodes.flat()) if (n) main.appendChild(n);
}

function failure(err) { return el("p", {class: "error", id: "page-error"}, String(err.message || err)); }

// --- jobs ------------------------------------------------------------------------------

function resources(job) {
  let cpuMillis = 0, mem = 0, gpus = 0, replicas = 0;
  for (const spec of (job.spec && job.spec.replica_specs) || []) {
    const n = Number(spec.replica_count || 0), r = spec.resources || {};
    replicas += n; cpuMillis += n * Number(r.cpu_millis || 0); mem += n * Number(r.memory_bytes || 0);
    gpus += n * Number(r.gpus || 0);
  }
  return `${replicas} × · ${cpu(cpuMillis)} CPU · ${bytes(mem)}${gpus ? ` · ${gpus} GPU` : ""}`;
}

async function jobsPage() {
  const body = await api("jobs");
  const rows = body.jobs.map((job) => el("tr", {"data-job": job.name},
    el("td", {}, el("a", {href: `#/jobs/${encodeURIComponent(job.name)}`}, job.name)),
    el("td", {class: `state-${job.state}`}, short(job.state, "JOB_STATE_")),
    el("td", {}, job.reason), el("td", {}, age(job.create_time)), el("td", {}, resources(job))));
  show(el("h1", {}, `Jobs of ${body.tenant}`),
    body.jobs.length ? table(["Name", "State", "Reason", "Age", "Resources"], rows)
      : el("p", {class: "muted", id: "no-jobs"}, "No jobs."));
  refreshIn(5000, jobsPage);
}

function seriesByRun(series, metric) {
  const runs = {};
  for (const s of series.filter((x) => x.name === metric)) {
    for (const [step, value, attempt] of s.points) {
      const key = `${s.replica} attempt ${attempt}`;
      (runs[key] = runs[key] || []).push([Number(step), Number(value)]);
    }
  }
  return Object.entries(runs).map(([label, points]) => ({label, points: points.sort((a, b) => a[0] - b[0])}));
}

function drawMetric(plot, series, metric, logY) {
  Plot.draw(plot, {series: seriesByRun(series, metric), xLabel: "step", yLabel: metric || "", logY,
    empty: "no metrics reported yet"});
}

async function jobPage(name) {
  const [{job, tensorboard}, metrics] = await Promise.all([
    api(`jobs/${encodeURIComponent(name)}`), api(`jobs/${encodeURIComponent(name)}/metrics`)]);
  const actions = el("div", {class: "toolbar"});
  if (!TERMINAL.has(job.state)) {
    actions.appendChild(el("button", {class: "danger", id: "cancel-job", onclick: async () => {
      if (!confirm(`Cancel job ${job.name}?`)) return;
      try { await api(`jobs/${encodeURIComponent(name)}/cancel`, {method: "POST"}); route(); }
      catch (err) { actions.appendChild(failure(err)); }
    }}, "Cancel"));
  }
  if (tensorboard && tensorboard.state === "TENSORBOARD_STATE_RUNNING") {
    actions.appendChild(el("button", {id: "open-tensorboard", onclick: async () => {
      const {link} = await api(`tensorboards/${encodeURIComponent(tensorboard.name)}/open`, {method: "POST"});
      window.open(link, "_blank", "noopener");
    }}, "Open TensorBoard"));
  } else {
    actions.appendChild(el("span", {class: "muted"}, `TensorBoard: run \`cloudml jobs tensorboard ${job.name}\``));
  }
  const names = [...new Set(metrics.series.map((s) => s.name))].sort();
  const metric = names.includes(state.metric) ? state.metric : (names.includes("loss") ? "loss" : names[0]);
  const plot = el("div", {id: "metric-plot"});
  const logY = el("input", {type: "checkbox", id: "metric-log", checked: !!state.logY});
  const redraw = () => drawMetric(plot, metrics.series, picker.value, logY.checked);
  const picker = el("select", {id: "metric-name", onchange: () => { state.metric = picker.value; redraw(); }},
    names.map((n) => el("option", {value: n, selected: n === metric}, n)));
  logY.onchange = () => { state.logY = logY.checked; redraw(); };
  drawMetric(plot, metrics.series, metric, logY.checked);
  const events = (job.events || []).map((e) => el("tr", {}, el("td", {}, e.time ? new Date(e.time).toLocaleString() : ""),
    el("td", {}, short(e.state, "JOB_STATE_")), el("td", {}, e.reason), el("td", {}, e.message), el("td", {}, e.attempt)));
  const replicas = (job.replicas || []).map((r) => el("tr", {},
    el("td", {}, `${short(r.replica.type, "REPLICA_TYPE_").toLowerCase()}-${r.replica.index || 0}`),
    el("td", {}, short(r.state, "REPLICA_STATE_")), el("td", {}, r.exit_code ?? ""), el("td", {}, r.reason)));
  show(el("h1", {}, `Job ${job.name} `, el("span", {class: `state-${job.state}`, id: "job-state"}, short(job.state, "JOB_STATE_"))),
    el("p", {}, job.reason ? `${job.reason}: ` : "", job.message || "", el("span", {class: "muted"},
      ` · created ${age(job.create_time)} ago · attempts ${job.attempts || 0} · ${resources(job)}`)),
    actions,
    el("h2", {}, "Metrics ", picker, " ", el("label", {class: "muted"}, logY, "log scale")), plot,
    el("h2", {}, "Logs"), logsPanel(job),
    el("div", {class: "row"},
      el("div", {}, el("h2", {}, "Replicas"), table(["Replica", "State", "Exit", "Reason"], replicas)),
      el("div", {}, el("h2", {}, "Events"), table(["Time", "State", "Reason", "Message", "Attempt"], events))));
  if (!TERMINAL.has(job.state)) refreshIn(5000, () => refreshJob(name));
}

async function refreshJob(name) {
  // The plot and the state refresh; the log panel keeps streaming.
  const [{job}, metrics] = await Promise.all([
    api(`jobs/${encodeURIComponent(name)}`), api(`jobs/${encodeURIComponent(name)}/metrics`)]);
  const badge = document.getElementById("job-state");
  if (badge) { badge.textContent = short(job.state, "JOB_STATE_"); badge.className = `state-${job.state}`; }
  const picker = document.getElementById("metric-name"), plot = document.getElementById("metric-plot");
  if (plot && picker) drawMetric(plot, metrics.series, picker.value, !!state.logY);
  if (!TERMINAL.has(job.state)) refreshIn(5000, () => refreshJob(name));
}

function logsPanel(job) {
  const pre = el("pre", {class: "logs", id: "logs"});
  const replica = el("select", {id: "log-replica"}, el("option", {value: ""}, "all replicas"),
    (job.replicas || []).map((r) => {
      const id = `${short(r.replica.type, "REPLICA_TYPE_").toLowerCase()}-${r.replica.index || 0}`;
      return el("option", {value: id}, id);
    }));
  const search = el("input", {id: "log-search", type: "search", placeholder: "search"});
  const follow = el("input", {id: "log-follow", type: "checkbox", checked: !TERMINAL.has(job.state)});
  const count = el("span", {class: "muted", id: "log-count"});
  let lines = [];
  const render = () => {
    const q = search.value;
    pre.textContent = "";
    let shown = 0;
    for (const line of lines) {
      if (q && !line.text.includes(q)) continue;
      shown++;
      const prefix = `[${line.replica}${line.attempt ? ` #${line.attempt}` : ""}] `;
      pre.appendChild(document.createTextNode(prefix));
      if (q) {
        const parts = line.text.split(q);
        parts.forEach((part, i) => {
          pre.appendChild(document.createTextNode(part));
          if (i < parts.length - 1) pre.appendChild(el("mark", {}, q));
        });
      } else pre.appendChild(document.createTextNode(line.text));
      pre.appendChild(document.createTextNode("\n"));
    }
    count.textContent = `${shown} of ${lines.length} lines${state.following ? " · following" : ""}`;
    if (follow.checked) pre.scrollTop = pre.scrollHeight;
  };
  const load = async () => {
    if (state.abort) state.abort.abort();
    const abort = state.abort = new AbortController();
    lines = [];
    state.following = follow.checked;
    render();
    const query = {tail: "2000"};
    if (replica.value) query.replica = replica.value;
    if (follow.checked) query.follow = "1";
    try {
      const response = await api(`jobs/${encodeURIComponent(job.name)}/logs`, {query, stream: true, signal: abort.signal});
      if (!response.ok) { const b = await response.json(); throw new Error(b.error); }
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        const parts = buffer.split("\n");
        buffer = parts.pop();
        for (const part of parts) if (part) {
          const line = JSON.parse(part);
          if (line.error) throw new Error(line.error);
          lines.push(line);
        }
        render();
      }
    } catch (err) {
      if (err.name !== "AbortError") lines.push({replica: "console", attempt: 0, text: `error: ${err.message}`});
    }
    if (abort === state.abort) { state.following = false; render(); }
  };
  replica.onchange = load;
  follow.onchange = load;
  search.oninput = render;
  setTimeout(load, 0);
  return el("div", {}, el("div", {class: "toolbar"}, replica, search, el("label", {}, follow, " follow"), count), pre);
}

// --- models ----------------------------------------------------------------------------

async function modelsPage() {
  const body = await api("models");
  const cards = body.models.map((model) => {
    const versions = model.versions.map((v) => {
      const ready = (v.replicas || []).filter((r) => r.state === "MODEL_VERSION_STATE_AVAILABLE").length;
      const key = `${body.tenant}/${model.name}/${v.version}`;
      let rate = "", latency = "", errs = "";
      if (!model.figures_shared_name && !v.requests) v.requests = {requests: 0, errors: 0, seconds: 0};
      if (v.requests) {
        const prev = state.rates[key];
        if (prev && body.time > prev.time) rate = ((v.requests.requests - prev.requests) / (body.time - prev.time)).toFixed(2);
        latency = v.requests.requests ? (1000 * v.requests.seconds / v.requests.requests).toFixed(2) : "";
        errs = String(v.requests.errors);
        state.rates[key] = {time: body.time, requests: v.requests.requests};
      } else if (model.figures_shared_name) rate = "(name shared with another tenant: not shown)";
      return el("tr", {}, el("td", {}, v.version), el("td", {}, short(v.state, "MODEL_VERSION_STATE_")),
        el("td", {class: "replicas"}, `${ready}/${v.desired_replicas || v.min_replicas || 0}`),
        el("td", {class: "requests"}, v.requests ? v.requests.requests : ""), el("td", {class: "rate"}, rate),
        el("td", {class: "latency"}, latency), el("td", {}, errs),
        el("td", {}, (v.status && v.status.message) || ""));
    });
    const artifacts = model.versions.flatMap((v) => (v.artifacts || []).map((a) => {
      const done = a.state === "EXPORT_STATE_SUCCEEDED";
      const href = `/ui/api/models/${encodeURIComponent(model.name)}/versions/${v.version}/artifacts/` +
        `${encodeURIComponent(a.id)}${tenantQuery()}`;
      const options = short(a.options.optimization, "EXPORT_OPTIMIZATION_").toLowerCase().replace("_", "-");
      return el("tr", {class: "artifact"}, el("td", {}, v.version), el("td", {}, a.id),
        el("td", {}, short(a.format, "EXPORT_FORMAT_").toLowerCase()),
        el("td", {}, `optimize=${options === "unspecified" ? "none" : options}` +
          (a.options.signature ? ` signature=${a.options.signature}` : "")),
        el("td", {}, short(a.state, "EXPORT_STATE_")), el("td", {}, done ? a.artifact.size_bytes : ""),
        el("td", {class: "sha256"}, done ? a.artifact.sha256.slice(0, 16) : ""),
        el("td", {}, done ? el("a", {href: href, download: ""}, "download") : (a.message || "")));
    }));
    const labels = Object.entries(model.labels || {}).map(([k, v]) => `${k} → ${v}`).join(", ") || "none";
    const split = (model.traffic_split || []).map((t) => `v${t.version}: ${t.percent}%`).join(", ") || "default version";
    return el("div", {class: "card", "data-model": model.name},
      el("h2", {}, model.name, model.public ? el("span", {class: "muted"}, " (public)") : null),
      el("p", {}, `default version ${Number(model.default_version) || "-"} · labels: ${labels} · traffic: ${split}`),
      table(["Version", "State", "Replicas ready/total", "Requests", "Req/s", "Mean latency ms", "Errors", "Status"], versions),
      artifacts.length ? el("h3", {}, "Artifacts (exports for devices)") : null,
      artifacts.length ? table(["Version", "Artifact", "Format", "Options", "State", "Bytes", "SHA-256", ""], artifacts)
        : null,
      predictForm(model));
  });
  show(el("h1", {}, `Models of ${body.tenant}`), cards.length ? cards : el("p", {class: "muted"}, "No models."));
  refreshIn(10000, modelsPage, true);
}

function predictForm(model) {
  const input = el("textarea", {class: "predict-input", spellcheck: "false"}, '{"instances": []}');
  const version = el("select", {}, el("option", {value: ""}, "routed version"),
    model.versions.map((v) => el("option", {value: v.version}, `v${v.version}`)));
  const out = el("pre", {class: "result predict-output"});
  const run = el("button", {onclick: async () => {
    out.textContent = "…";
    try {
      const body = await api(`models/${encodeURIComponent(model.name)}/predict`,
        {method: "POST", body: input.value, query: version.value ? {version: version.value} : {}, keepErrors: true});
      out.textContent = JSON.stringify(body, null, 1);
    } catch (err) { out.textContent = `error: ${err.message}`; }
  }}, "Predict");
  return el("details", {}, el("summary", {}, "Try Predict (TF Serving JSON)"), input,
    el("div", {class: "toolbar"}, version, run), out);
}

// --- studies ---------------------------------------------------------------------------

function paramText(params) {
  return Object.entries(params || {}).map(([k, v]) => `${k}=${Object.values(v)[0]}`).join(" ");
}

async function studiesPage() {
  const body = await api("studies");
  const rows = body.studies.map((s) => el("tr", {},
    el("td", {}, el("a", {href: `#/studies/${encodeURIComponent(s.name)}`}, s.name)),
    el("td", {class: `state-${s.state}`}, short(s.state, "STUDY_STATE_")),
    el("td", {}, `${short(s.spec.goal, "GOAL_").toLowerCase()} ${s.spec.metric}`),
    el("td", {}, Object.entries(s.trial_counts || {}).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(", ")),
    el("td", {}, s.best_trial && s.best_trial.objective_value !== undefined
      ? `#${s.best_trial.number}: ${Plot.fmt(s.best_trial.objective_value)}` : ""),
    el("td", {}, age(s.create_time))));
  show(el("h1", {}, `Studies of ${body.tenant}`),
    rows.length ? table(["Name", "State", "Objective", "Trials", "Best", "Age"], rows) : el("p", {class: "muted"}, "No studies."));
  refreshIn(5000, studiesPage);
}

async function studyPage(name) {
  const {study, trials} = await api(`studies/${encodeURIComponent(name)}`);
  const best = study.best_trial && study.best_trial.objective_value !== undefined ? study.best_trial.number : null;
  const maximize = study.spec.goal === "GOAL_MAXIMIZE";
  const done = trials.filter((t) => t.objective_value !== undefined).sort((a, b) => a.number - b.number);
  const rows = trials.slice().sort((a, b) => a.number - b.number).map((t) => el("tr", {
    class: t.number === best ? "best" : "", "data-trial": t.number},
  el("td", {}, t.number === best ? `★ ${t.number}` : t.number), el("td", {class: `state-${t.state}`}, short(t.state, "TRIAL_STATE_")),
  el("td", {}, paramText(t.params)), el("td", {}, t.objective_value !== undefined ? Plot.fmt(t.objective_value) : ""),
  el("td", {}, t.job_name ? el("a", {href: `#/jobs/${encodeURIComponent(t.job_name)}`}, t.job_name) : ""),
  el("td", {}, t.reason || "")));
  let bestSoFar = null;
  const running = done.map((t) => {
    const v = t.objective_value;
    bestSoFar = bestSoFar === null ? v : (maximize ? Math.max(bestSoFar, v) : Math.min(bestSoFar, v));
    return [t.number, bestSoFar];
  });
  const bestTrial = done.find((t) => t.number === best);
  const marks = bestTrial ? [{x: bestTrial.number, y: bestTrial.objective_value, label: `best: trial ${best}`}] : [];
  const objective = el("div", {id: "objective-plot"});
  Plot.draw(objective, {series: [
    {label: study.spec.metric, points: done.map((t) => [t.number, t.objective_value]), line: false},
    {label: "best so far", points: running, dots: false}], marks, xLabel: "trial", yLabel: study.spec.metric});
  const scatters = [];
  const numeric = new Set();
  for (const t of done) for (const [k, v] of Object.entries(t.params || {})) {
    if (v.double_value !== undefined || v.int_value !== undefined) numeric.add(k);
  }
  for (const param of [...numeric].sort()) {
    const value = (t) => Number(Object.values(t.params[param] || {})[0]);
    const box = el("div", {class: "scatter", "data-param": param});
    Plot.draw(box, {width: 320, height: 220, xLabel: param, yLabel: study.spec.metric,
      series: [{label: "", points: done.filter((t) => t.params[param]).map((t) => [value(t), t.objective_value]), line: false}],
      marks: bestTrial && bestTrial.params[param] ? [{x: value(bestTrial), y: bestTrial.objective_value, label: "best"}] : []});
    scatters.push(box);
  }
  show(el("h1", {}, `Study ${study.name} `, el("span", {class: `state-${study.state}`}, short(study.state, "STUDY_STATE_"))),
    el("p", {}, `${maximize ? "maximize" : "minimize"} ${study.spec.metric} · ${trials.length} trials`,
      best !== null ? ` · best: trial ${best} (${Plot.fmt(study.best_trial.objective_value)}) ${paramText(study.best_trial.params)}` : ""),
    el("h2", {}, "Objective per trial"), objective,
    scatters.length ? el("h2", {}, "Parameters vs objective") : null, el("div", {class: "row"}, scatters),
    el("h2", {}, "Trials"), table(["Trial", "State", "Parameters", "Objective", "Job", "Reason"], rows));
  if (study.state === "STUDY_STATE_RUNNING") refreshIn(5000, () => studyPage(name));
}

// --- quota -----------------------------------------------------------------------------

async function quotaPage() {
  const body = await api("quota");
  const kinds = [["cpu_millis", "CPU", cpu], ["memory_bytes", "Memory", bytes], ["gpus", "GPUs", String],
    ["train_jobs", "Train jobs", String], ["model_replicas", "Model replicas", String], ["studies", "Studies", String],
    ["dev_environments", "Dev environments", String], ["tensorboards", "TensorBoards", String]];
  const rows = kinds.map(([key, label, f]) => {
    const used = Number((body.usage || {})[key] || 0), limit = Number((body.limits || {})[key] || 0);
    const fill = el("div", {class: limit && used >= limit ? "full" : ""});
    fill.style.width = `${limit ? Math.min(100, 100 * used / limit) : 0}%`;
    return el("tr", {"data-resource": key}, el("td", {}, label), el("td", {}, el("div", {class: "bar"}, fill)),
      el("td", {}, `${f(used)} of ${limit ? f(limit) : "no limit"}`));
  });
  show(el("h1", {}, `Quota of ${body.tenant}`), table(["Resource", "Usage", ""], rows));
  refreshIn(10000, quotaPage);
}

// --- routing ---------------------------------------------------------------------------

function refreshIn(ms, fn, keepOpenDetails) {
  clearTimeout(state.timer);
  const hash = location.hash;
  state.timer = setTimeout(() => {
    if (location.hash !== hash) return;
    if (keepOpenDetails && document.querySelector("details[open]")) { refreshIn(ms, fn, keepOpenDetails); return; }
    fn().catch((err) => show(failure(err)));
  }, ms);
}

async function route() {
  clearTimeout(state.timer);
  if (state.abort) { state.abort.abort(); state.abort = null; }
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const tenant = new URLSearchParams(query || "").get("tenant");
  if (tenant && state.session.admin) state.tenant = tenant;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === `nav-${parts[0]}`);
  try {
    if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (parts[0] === "models") await modelsPage();
    else if (parts[0] === "studies" && parts[1]) await studyPage(parts[1]);
    else if (parts[0] === "studies") await studiesPage();
    else if (parts[0] === "quota") await quotaPage();
    else await jobsPage();
  } catch (err) {
    show(failure(err));
  }
}

async function start() {
  state.session = await api("session", {raw: true});
  state.tenant = state.session.tenant;
  document.getElementById("who").textContent = `${state.session.tenant}${state.session.admin ? " (admin)" : ""}`;
  const switcher = document.getElementById("tenant-switch");
  if (state.session.admin) {
    for (const t of state.session.tenants) switcher.appendChild(el("option", {value: t, selected: t === state.tenant}, t));
    switcher.hidden = false;
    switcher.onchange = () => { state.tenant = switcher.value; location.hash = "#/jobs"; route(); };
  }
  window.addEventListener("hashchange", route);
  await route();
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => show(failure(err))));
