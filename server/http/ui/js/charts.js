// Line charts drawn by uPlot (vendored, static/vendor/uplot), sized to their container and redrawn on resize.
/* global uPlot */

// Colours with at least 3:1 contrast against the white chart background (WCAG's figure for graphics).
export const PALETTE = ["#1f5fbf", "#b8430b", "#1b7a3a", "#8a2be2", "#a3183a", "#00707a", "#6b5a00", "#444444"];

const HEIGHT = 190;

export class LineChart {
  // el: the container; series: [{label, color?, points?, spanGaps?, value?: (u, v) => text}];
  // opts: {time: bool, yLabel, xLabel, yRange: [min, max], xWindow: seconds}
  constructor(el, series, { time = true, yLabel = "", xLabel = "", yRange, xWindow } = {}) {
    this.el = el;
    this.time = time;
    this.data = [[], ...series.map(() => [])];
    const axisStroke = "#333";
    const grid = { stroke: "#e3e3e3", width: 1 };
    this.plot = new uPlot({
      width: this.width(),
      height: HEIGHT,
      scales: {
        // xWindow: always show that many seconds up to the newest point (the last minutes, however few points)
        x: xWindow ? { time, range: (u, min, max) => [max - xWindow, max] } : { time },
        y: yRange ? { range: yRange } : { auto: true },
      },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      axes: [
        { stroke: axisStroke, grid, label: xLabel || undefined, labelSize: xLabel ? 18 : 0 },
        { stroke: axisStroke, grid, label: yLabel || undefined, labelSize: yLabel ? 18 : 0, size: 56 },
      ],
      series: [
        { label: time ? "time" : xLabel || "x" },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color || PALETTE[i % PALETTE.length],
          width: 2,
          points: { show: s.points ?? !time, size: 5 },
          spanGaps: s.spanGaps ?? false,
          value: s.value || ((u, v) => (v === null || v === undefined ? "—" : fmtAxis(v))),
        })),
      ],
    }, this.data, el);
    this.resize = new ResizeObserver(() => this.plot.setSize({ width: this.width(), height: HEIGHT }));
    this.resize.observe(el);
  }

  width() {
    return Math.max(200, Math.floor(this.el.getBoundingClientRect().width) || 300);
  }

  // Append one point: x, then one value per series (undefined → a gap).
  push(x, ...values) {
    this.data[0].push(x);
    for (let i = 1; i < this.data.length; i++) {
      const v = values[i - 1];
      this.data[i].push(v === undefined || !Number.isFinite(v) ? null : v);
    }
  }

  // Set series i at x: on the last point when it has that x, else on a new point (the other series a gap there).
  put(x, i, v) {
    const xs = this.data[0];
    if (xs.length === 0 || xs[xs.length - 1] !== x) this.push(x);
    this.data[i + 1][xs.length - 1] = v === undefined || !Number.isFinite(v) ? null : v;
  }

  // Keep only the points with x >= minX.
  trim(minX) {
    let n = 0;
    while (n < this.data[0].length && this.data[0][n] < minX) n++;
    if (n) this.data = this.data.map((col) => col.slice(n));
  }

  // Draw the data now; the container's data-points says how many points each series has drawn (for tests).
  redraw() {
    this.plot.setData(this.data);
    this.el.dataset.points = this.data.slice(1).map((col) => col.filter((v) => v !== null).length).join(",");
  }

  // Draw at the next frame (many updates in one frame draw once).
  scheduleRedraw() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => {
      this.pending = null;
      this.redraw();
    });
  }

  // Points of series i that are not gaps (what the page has drawn).
  count(i = 0) {
    return this.data[i + 1].filter((v) => v !== null).length;
  }

  destroy() {
    if (this.pending) cancelAnimationFrame(this.pending);
    this.resize.disconnect();
    this.plot.destroy();
  }
}

function fmtAxis(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toLocaleString("en");
  if (a >= 1) return v.toFixed(2);
  return v.toPrecision(3);
}
