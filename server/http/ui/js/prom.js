// Reading /metrics (the Prometheus text exposition format) and what the charts derive from successive scrapes:
// rates of counters and histogram quantiles over a window, computed as Prometheus' rate() and
// histogram_quantile() do. A series the server does not export reads as undefined (the page shows "—").

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"/g;

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text); // "NaN" → NaN
}

function unescape(value) {
  return value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

export class Scrape {
  // text: the body of /metrics; time: seconds (performance clock or epoch, the same for every scrape compared)
  constructor(text, time) {
    this.time = time;
    this.samples = new Map(); // name → [{labels, value}]
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = SAMPLE.exec(line);
      if (!m) continue;
      const labels = {};
      if (m[2]) for (const [, k, v] of m[2].matchAll(LABEL)) labels[k] = unescape(v);
      const list = this.samples.get(m[1]) || [];
      list.push({ labels, value: parseValue(m[3]) });
      this.samples.set(m[1], list);
    }
  }

  // The samples of a series; a counter may be exported as NAME or NAME_total (prometheus_client adds _total).
  series(name) {
    return this.samples.get(name) || this.samples.get(`${name}_total`) || [];
  }

  has(name) {
    return this.series(name).length > 0;
  }

  // The sum over the samples whose labels include `match`; undefined when the series is absent.
  value(name, match = {}) {
    const list = this.series(name).filter((s) => matches(s.labels, match));
    if (list.length === 0) return undefined;
    return list.reduce((a, s) => a + s.value, 0);
  }

  // Values by one label: {labelValue: sum}.
  by(name, label, match = {}) {
    const out = {};
    for (const s of this.series(name)) {
      if (!matches(s.labels, match) || !(label in s.labels)) continue;
      out[s.labels[label]] = (out[s.labels[label]] || 0) + s.value;
    }
    return out;
  }

  // A histogram's cumulative buckets summed over its other labels: [[le, count], ...] by le, or undefined.
  buckets(name, match = {}) {
    const list = this.samples.get(`${name}_bucket`);
    if (!list) return undefined;
    const byLe = new Map();
    for (const s of list) {
      if (!matches(s.labels, match)) continue;
      const le = parseValue(s.labels.le);
      byLe.set(le, (byLe.get(le) || 0) + s.value);
    }
    return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
  }
}

function matches(labels, match) {
  return Object.entries(match).every(([k, v]) => labels[k] === v);
}

// Per-second increase of a counter between two scrapes (a reset counts from zero, as Prometheus' rate()).
export function rate(older, newer, name, match = {}) {
  const a = older && older.value(name, match);
  const b = newer.value(name, match);
  if (a === undefined || b === undefined) return undefined;
  const dt = newer.time - older.time;
  if (dt <= 0) return undefined;
  return (b >= a ? b - a : b) / dt;
}

// The q-quantile of the observations a histogram gained between two scrapes, interpolated linearly within the
// bucket (Prometheus' histogram_quantile); undefined when the series is absent or nothing was observed.
export function quantile(q, older, newer, name, match = {}) {
  const now = newer.buckets(name, match);
  if (!now || now.length === 0) return undefined;
  const before = new Map((older && older.buckets(name, match)) || []);
  const delta = now.map(([le, c]) => [le, Math.max(0, c - (before.get(le) || 0))]);
  return bucketQuantile(q, delta);
}

export function bucketQuantile(q, buckets) {
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!(total > 0)) return undefined;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === Infinity) return prevLe; // in the open last bucket: its lower bound, as Prometheus answers
      if (count === prevCount) return le;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / (count - prevCount);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}
