// Human units for the Connections view's traffic columns (docs/ui.md, "Traffic"): decimal units
// (1 kB = 1000 B), one decimal below 100 of a unit, whole numbers from 100: "950 B", "1.2 MB",
// "12.5 kB/s", "0.4 ms", "35 ms". Missing values give "". No DOM here.

const BYTE_UNITS = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];

// Bytes (a count: "950 B", "1.0 kB", "1.2 MB"; a fraction of a byte only for a rate: "0.4 B").
export function formatBytes(n) {
  if (typeof n !== "number" || !(n >= 0) || n === Infinity) return "";
  let v = n;
  for (let i = 0; ; i++, v /= 1000) {
    if (i === 0 && Number.isInteger(v) && v < 1000) return `${v} B`;
    const tenths = Math.round(v * 10);
    if (tenths < 1000) return `${(tenths / 10).toFixed(1)} ${BYTE_UNITS[i]}`;
    const whole = Math.round(v);
    if (whole < 1000 || i === BYTE_UNITS.length - 1) return `${whole} ${BYTE_UNITS[i]}`;
  }
}

// Bytes per second: "12.5 kB/s".
export function formatRate(n) {
  const bytes = formatBytes(n);
  return bytes && `${bytes}/s`;
}

// A round-trip time given in µs (rttUs): "45 µs" below 0.1 ms, "0.4 ms", "35 ms", "1.2 s". 0 (never
// measured) and missing give "".
export function formatRtt(us) {
  if (typeof us !== "number" || !(us > 0) || us === Infinity) return "";
  if (Math.round(us) < 100) return `${Math.round(us)} µs`;
  const ms = us / 1000;
  const tenths = Math.round(ms * 10);
  if (tenths < 100) return `${(tenths / 10).toFixed(1)} ms`;
  const whole = Math.round(ms);
  if (whole < 1000) return `${whole} ms`;
  const s = ms / 1000;
  return Math.round(s * 10) < 1000 ? `${(Math.round(s * 10) / 10).toFixed(1)} s` : `${Math.round(s)} s`;
}
