// A small SVG plot for the console (no library, no network): lines and points.
//
//   Plot.draw(container, {
//     series: [{label: "master-0 #0", points: [[x, y], ...], line: true, dots: true}],
//     xLabel: "step", yLabel: "loss",
//     marks: [{x, y, label}],            // highlighted points (the best trial)
//     logY: false,                        // a log10 y axis (values <= 0 are left out)
//   });
//
// Every point is a <circle class="pt">; a highlighted one is <circle class="pt best">.
"use strict";

const Plot = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1a5fb4", "#e66100", "#26a269", "#c01c28", "#813d9c", "#986a44", "#0a7d8c", "#5e5c64"];

  function node(tag, attrs, parent) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, String(v));
    if (parent) parent.appendChild(n);
    return n;
  }

  function ticks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
    return out;
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  function draw(container, opts) {
    const width = opts.width || 560, height = opts.height || 260;
    const m = {l: 56, r: 12, t: 22, b: 36};
    const ty = opts.logY ? (p) => [p[0], p[1] > 0 ? Math.log10(p[1]) : NaN] : (p) => p;
    const series = (opts.series || []).filter((s) => s.points && s.points.length)
      .map((s) => Object.assign({}, s, {points: s.points.map(ty)}));
    const marks = (opts.marks || []).map((k) => Object.assign({}, k, {y: ty([k.x, k.y])[1]}));
    container.textContent = "";
    const svg = node("svg", {class: "plot", width, height, viewBox: `0 0 ${width} ${height}`, role: "img"});
    container.appendChild(svg);
    const all = series.flatMap((s) => s.points).concat(marks.map((k) => [k.x, k.y]))
      .filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (!all.length) {
      node("text", {x: width / 2, y: height / 2, "text-anchor": "middle"}, svg).textContent = opts.empty || "no data yet";
      return svg;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const xpad = (x1 - x0) * 0.03; x0 -= xpad; x1 += xpad;
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    const X = (x) => m.l + (x - x0) / (x1 - x0) * (width - m.l - m.r);
    const Y = (y) => height - m.b - (y - y0) / (y1 - y0) * (height - m.t - m.b);
    for (const t of ticks(y0, y1, 5)) {
      node("line", {class: "grid", x1: m.l, x2: width - m.r, y1: Y(t), y2: Y(t)}, svg);
      node("text", {x: m.l - 4, y: Y(t) + 4, "text-anchor": "end"}, svg).textContent =
        opts.logY ? fmt(Math.pow(10, t)) : fmt(t);
    }
    for (const t of ticks(x0, x1, 6)) {
      node("text", {x: X(t), y: height - m.b + 14, "text-anchor": "middle"}, svg).textContent = fmt(t);
    }
    node("line", {class: "axis", x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b}, svg);
    node("line", {class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: height - m.b}, svg);
    if (opts.xLabel) node("text", {x: width - m.r, y: height - 4, "text-anchor": "end"}, svg).textContent = opts.xLabel;
    if (opts.yLabel) {
      node("text", {x: 4, y: 4, "dominant-baseline": "hanging"}, svg).textContent =
        opts.yLabel + (opts.logY ? " (log scale)" : "");
    }
    series.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      const pts = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
      if (!pts.length) return;
      const g = node("g", {class: "series", "data-label": s.label || ""}, svg);
      if (s.line !== false && pts.length > 1) {
        node("polyline", {fill: "none", stroke: color, "stroke-width": 1.5,
          points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ")}, g);
      }
      if (s.dots !== false) {
        for (const p of pts) {
          const c = node("circle", {class: "pt", cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: s.r || 2.5,
            fill: color}, g);
          const y = opts.logY ? Math.pow(10, p[1]) : p[1];
          node("title", {}, c).textContent = `${s.label ? s.label + ": " : ""}${fmt(p[0])}, ${fmt(y)}`;
        }
      }
    });
    for (const k of marks) {
      const c = node("circle", {class: "pt best", cx: X(k.x), cy: Y(k.y), r: 6}, svg);
      node("title", {}, c).textContent = k.label || "best";
    }
    if (series.length > 1 || (series.length === 1 && series[0].label)) {
      const legend = document.createElement("div");
      legend.className = "legend muted";
      series.forEach((s, i) => {
        const item = document.createElement("span");
        item.textContent = `■ ${s.label}  `;
        item.style.color = s.color || COLORS[i % COLORS.length];
        legend.appendChild(item);
      });
      container.appendChild(legend);
    }
    return svg;
  }

  return {draw, fmt};
})();
