// The "Probes" tab of TensorBoard: plain ES module, canvas drawing, no dependencies.
// TensorBoard loads it in an iframe whose base URL is data/plugin/probes/, so fetch("runs") reaches the plugin.
// Query parameters of the page (run, run2, probe, field, epoch, scale) preselect the controls.

const params = new URLSearchParams(window.location.search);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
};
const getJSON = async (route, query) => {
  const response = await fetch(route + "?" + new URLSearchParams(query), {cache: "no-store"});
  const payload = await response.json();
  if (!response.ok) throw new Error(payload.error || response.statusText);
  return payload;
};
const select = (id, options, chosen) => {
  const node = el("select", {id});
  for (const o of options) node.append(el("option", {value: o}, o));
  if (chosen !== null && options.includes(chosen)) node.value = chosen;
  return node;
};

// viridis, 9 stops, interpolated
const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],
  [109,205,89],[180,222,44],[253,231,37]];
function colour(t) {
  if (!Number.isFinite(t)) return [211, 211, 211];
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}
const SIGN_COLOURS = [[255,255,255],[220,40,40],[40,160,40],[0,0,0]];

const tooltip = el("div", {class: "tooltip", id: "tooltip"});

// Draw a rows x columns matrix on a canvas; cell colour from scale(value); hover shows label(i, j, value).
function drawMatrix(canvas, values, scale, label, cell = null) {
  const rows = values.length, cols = rows ? values[0].length : 0;
  const cw = cell || Math.max(1, Math.min(24, Math.floor(900 / Math.max(1, cols))));
  const ch = cell || Math.max(4, Math.min(24, Math.floor(480 / Math.max(1, rows))));
  canvas.width = Math.max(1, cols * cw); canvas.height = Math.max(1, rows * ch);
  canvas.dataset.rows = rows; canvas.dataset.columns = cols;
  let sum = 0;
  const ctx = canvas.getContext("2d"), image = ctx.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
    const v = values[i][j];
    if (v !== null) sum += v;
    const [r, g, b] = scale(v);
    for (let y = i * ch; y < (i + 1) * ch; y++) for (let x = j * cw; x < (j + 1) * cw; x++) {
      const p = (y * canvas.width + x) * 4;
      image.data[p] = r; image.data[p + 1] = g; image.data[p + 2] = b; image.data[p + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  canvas.dataset.checksum = sum.toPrecision(12);
  canvas.onmousemove = (e) => {
    const box = canvas.getBoundingClientRect();
    const j = Math.floor((e.clientX - box.left) / cw), i = Math.floor((e.clientY - box.top) / ch);
    if (i < 0 || j < 0 || i >= rows || j >= cols) { tooltip.style.display = "none"; return; }
    tooltip.textContent = label(i, j, values[i][j]);
    tooltip.style.left = (e.clientX + 12) + "px"; tooltip.style.top = (e.clientY + 12) + "px";
    tooltip.style.display = "block";
  };
  canvas.onmouseleave = () => { tooltip.style.display = "none"; };
  return {cw, ch};
}

// The canvas inside axes: row labels on the left (every k-th where rows are thinner than a line of text),
// column ticks below (about six, at cell centres) and an axis title; returns the wrapping element.
function withAxes(canvas, {cw, ch}, rowLabels, columnLabels, columnTitle) {
  const grid = el("div", {class: "axes"});
  // one in-flow box per row (so the column is as wide as the longest shown label); a thin row's label
  // overflows into the unlabelled rows below it
  const left = el("div", {class: "row-labels"});
  const every = Math.max(1, Math.ceil(14 / ch));
  rowLabels.forEach((text, i) => {
    const shown = i % every === 0;
    left.append(el("div", {class: shown ? "row-label" : "row-spacer", title: text,
                           style: `height:${ch}px;line-height:${Math.max(ch, 14)}px`}, shown ? text : ""));
  });
  const bottom = el("div", {class: "column-ticks", style: `width:${canvas.width}px`});
  const n = columnLabels.length, ticks = Math.min(n, 6);
  const at = new Set(Array.from({length: ticks}, (_, k) => ticks > 1 ? Math.round(k * (n - 1) / (ticks - 1)) : 0));
  for (const j of at) bottom.append(el("div", {class: "column-tick", style: `left:${j * cw + cw / 2}px`}, String(columnLabels[j])));
  grid.append(left, canvas, el("div"), bottom, el("div"), el("div", {class: "axis-title"}, columnTitle));
  return grid;
}

// A horizontal colour bar from low to high (log10 where log) with its two end values.
function colourBar(low, high, log) {
  const bar = el("canvas", {class: "colour-bar", width: 160, height: 10});
  const ctx = bar.getContext("2d");
  for (let x = 0; x < 160; x++) { const [r, g, b] = colour(x / 159); ctx.fillStyle = `rgb(${r},${g},${b})`; ctx.fillRect(x, 0, 1, 10); }
  return el("div", {class: "legend"}, fmt(low), bar, fmt(high) + (log ? " (log scale)" : ""));
}

function valueScale(low, high, log) {
  if (log) {
    const a = Math.log10(low), b = Math.log10(high);
    return (v) => (v === null || v <= 0) ? colour(NaN) : colour(b > a ? (Math.log10(v) - a) / (b - a) : 0.5);
  }
  return (v) => v === null ? colour(NaN) : colour(high > low ? (v - low) / (high - low) : 0.5);
}
const fmt = (v) => v === null ? "none" : Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toPrecision(4);

async function heatmapPanel(container, run, probe, field, logScale) {
  const data = await getJSON("heatmap", {run, probe, field, max_columns: 900});
  const canvas = el("canvas", {class: "heatmap", "data-run": run, "data-probe": probe, "data-field": field,
                               "data-total-steps": data.total_steps, "data-bin": data.bin});
  const log = logScale && data.min_positive !== null;
  const scale = valueScale(log ? data.min_positive : data.min ?? 0, data.max ?? 1, log);
  const size = drawMatrix(canvas, data.values, scale, (i, j, v) =>
    `${data.layers[i]}\nstep ${data.steps[j]}${data.bin > 1 ? " (bin of " + data.bin + " logged steps)" : ""}\n${field} = ${fmt(v)}`);
  container.append(el("h3", {}, `${run}: ${probe} / ${field}`),
    el("div", {class: "note"}, `${data.layers.length} layers x ${data.steps.length} columns` +
      (data.bin > 1 ? ` (${data.total_steps} steps, bins of ${data.bin})` : "")),
    withAxes(canvas, size, data.layers, data.steps, data.bin > 1 ? "step (first of each bin)" : "step"),
    colourBar(log ? data.min_positive : data.min ?? 0, data.max ?? 1, log));
}

async function signMapPanel(container, run, probe) {
  const data = await getJSON("sign_map", {run, probe});
  if (!data.rows.length) return;
  const canvas = el("canvas", {class: "sign-map", "data-run": run});
  const size = drawMatrix(canvas, data.rows, (v) => SIGN_COLOURS[v] || [211, 211, 211],
    (i, j, v) => `epoch ${data.epochs[i]}\nentry ${j * data.stride}\n` +
      ["|g| > threshold", "small g < 0", "small g > 0", "g = 0"][v]);
  const entries = Array.from({length: data.rows[0].length}, (_, j) => j * data.stride);
  container.append(el("h3", {}, `${run}: gradient sign map`),
    el("div", {class: "note"}, "white |g| > threshold, red small negative, green small positive, black zero; " +
      `${data.columns} sampled entries` + (data.stride > 1 ? `, every ${data.stride}th shown` : "")),
    withAxes(canvas, size, data.epochs.map((e) => `epoch ${e}`), entries, "sampled entry"));
}

// A panel with an epoch slider: fetch(epoch) returns the payload, draw(payload, box) draws it.
async function epochPanel(container, title, first, fetchAt, draw) {
  const box = el("div");
  const slider = el("input", {type: "range", class: "epoch-slider", min: 0, max: Math.max(0, first.epochs.length - 1),
                              step: 1, value: Math.max(0, first.epochs.indexOf(first.epoch))});
  const label = el("span", {class: "epoch-label"}, `epoch ${first.epoch}`);
  slider.oninput = async () => {
    const payload = await fetchAt(first.epochs[Number(slider.value)]);
    label.textContent = `epoch ${payload.epoch}`;
    box.replaceChildren(); draw(payload, box);
  };
  container.append(el("h3", {}, title), el("div", {class: "controls"}, slider, label), box);
  draw(first, box);
}

async function matrixPanel(container, run, probe, field) {
  const query = (epoch) => getJSON("matrix", {run, probe, field, ...(epoch === undefined ? {} : {epoch})});
  const wanted = params.get("epoch");
  const first = await query(wanted === null ? undefined : wanted);
  if (!first.epochs.length) return;
  await epochPanel(container, `${run}: ${probe} / ${field}`, first, query, (m, box) => {
    const canvas = el("canvas", {class: "matrix", "data-epoch": m.epoch, "data-field": field});
    const size = drawMatrix(canvas, m.values, valueScale(0, 1, false),
      (i, j, v) => `${m.layers[i]}\n${m.layers[j]}\n${field} = ${fmt(v)}`, Math.max(8, Math.floor(320 / Math.max(1, m.layers.length))));
    box.append(withAxes(canvas, size, m.layers, m.layers.map((_, j) => j), "layer (numbered as the rows, from 0)"),
               colourBar(0, 1, false));
  });
}

function drawReliability(c, box) {
  const canvas = el("canvas", {class: "reliability", width: 260, height: 260, "data-epoch": c.epoch, "data-bins": c.bins});
  const ctx = canvas.getContext("2d"), w = 260, n = c.bins;
  ctx.strokeStyle = "#999"; ctx.beginPath(); ctx.moveTo(0, w); ctx.lineTo(w, 0); ctx.stroke();
  for (let b = 0; b < n; b++) {
    const acc = c.accuracy_per_bin[b];
    if (acc === null) continue;
    ctx.fillStyle = "rgba(25,118,210,.8)";
    ctx.fillRect(b * w / n + 1, w - acc * w, w / n - 2, acc * w);
  }
  canvas.onmousemove = (e) => {
    const b = Math.floor((e.clientX - canvas.getBoundingClientRect().left) / (w / n));
    if (b < 0 || b >= n) return;
    tooltip.textContent = `bin ${b}: ${c.count[b]} samples\nconfidence ${fmt(c.confidence[b])}\naccuracy ${fmt(c.accuracy_per_bin[b])}`;
    tooltip.style.left = (e.clientX + 12) + "px"; tooltip.style.top = (e.clientY + 12) + "px"; tooltip.style.display = "block";
  };
  canvas.onmouseleave = () => { tooltip.style.display = "none"; };
  box.append(el("div", {class: "note"}, `reliability (bin accuracy against confidence), ECE ${fmt(c.ece)}, accuracy ${fmt(c.accuracy)}`), canvas);
  if (c.confusion) {
    const rows = c.confusion.map((r) => { const s = r.reduce((a, b) => a + b, 0); return r.map((v) => s ? v / s : null); });
    const conf = el("canvas", {class: "confusion", "data-epoch": c.epoch});
    drawMatrix(conf, rows, valueScale(0, 1, false), (i, j) => `true ${i}, predicted ${j}\n${c.confusion[i][j]} samples`,
               Math.max(6, Math.floor(260 / rows.length)));
    box.append(el("div", {class: "note"}, "confusion (rows: targets, row-normalised)"), conf);
  } else {
    box.append(el("div", {class: "note"}, "sparse confusion: no matrix in the records"));
  }
}

async function confidencePanel(container, run, probe, stage) {
  const query = (epoch) => getJSON("confidence", {run, probe, stage, ...(epoch === undefined ? {} : {epoch})});
  const first = await query(params.get("epoch") ?? undefined);
  if (!first.epochs.length) return;
  await epochPanel(container, `${run}: ${probe} (${stage})`, first, query, drawReliability);
}

export async function render() {
  document.head.append(el("link", {rel: "stylesheet", href: "style.css"}));
  document.body.append(tooltip);
  const root = el("div", {id: "probes-root"});
  document.body.append(root);
  const status = el("div", {id: "status", class: "note"}, "loading");
  const {runs} = await getJSON("runs", {});
  if (!runs.length) { root.append(el("p", {}, "No run with probe records under the logdir.")); return; }
  const runA = select("run", runs, params.get("run") ?? runs[0]);
  const runB = select("run2", ["(none)", ...runs], params.get("run2") ?? "(none)");
  const probeSel = el("select", {id: "probe"}), fieldSel = el("select", {id: "field"});
  const scaleSel = select("scale", ["linear", "log"], params.get("scale") ?? "linear");
  const panels = el("div", {class: "panels", id: "panels"});
  root.append(el("div", {class: "controls"}, "run", runA, "beside", runB, "probe", probeSel, "field", fieldSel,
                 "colour", scaleSel, status), panels);
  let info = {};

  const fillFields = (keep) => {
    const entry = info[probeSel.value] || {fields: []};
    const previous = keep ?? fieldSel.value;
    fieldSel.replaceChildren(...entry.fields.map((f) => el("option", {value: f}, f)));
    if (entry.fields.includes(previous)) fieldSel.value = previous;
    else if (entry.kind === "pairs" && entry.fields.includes("cka")) fieldSel.value = "cka";
  };
  const draw = async () => {
    status.textContent = "loading";
    panels.replaceChildren();
    const chosen = [runA.value, ...(runB.value !== "(none)" && runB.value !== runA.value ? [runB.value] : [])];
    try {
      for (const run of chosen) {
        const panel = el("div", {class: "panel", "data-run": run});
        panels.append(panel);
        const fields = (await getJSON("fields", {run})).probes;
        const probe = probeSel.value, entry = fields[probe];
        if (!entry) { panel.append(el("p", {}, `${run} has no probe ${probe}`)); continue; }
        if (entry.kind === "layer" && entry.fields.includes(fieldSel.value))
          await heatmapPanel(panel, run, probe, fieldSel.value, scaleSel.value === "log");
        if (entry.sign_map) await signMapPanel(panel, run, probe);
        if (entry.kind === "pairs") await matrixPanel(panel, run, probe, fieldSel.value);
        if (entry.kind === "confidence") for (const stage of entry.stages) await confidencePanel(panel, run, probe, stage);
        if (entry.kind === "scalar") panel.append(el("p", {class: "note"}, `${probe} has no per-layer fields (${entry.records} records): see the Scalars tab`));
      }
      status.textContent = "";
      root.dataset.ready = "1";
    } catch (err) {
      status.textContent = "error: " + err.message;
      root.dataset.error = err.message;
    }
  };
  const loadRun = async () => {
    info = (await getJSON("fields", {run: runA.value})).probes;
    const names = Object.keys(info), previous = probeSel.value || params.get("probe");
    probeSel.replaceChildren(...names.map((n) => el("option", {value: n}, n)));
    probeSel.value = names.includes(previous) ? previous : (names.includes("gradient_stats") ? "gradient_stats" : names[0]);
    fillFields(fieldSel.value || params.get("field"));
  };
  runA.onchange = async () => { await loadRun(); await draw(); };
  runB.onchange = draw; scaleSel.onchange = draw; fieldSel.onchange = draw;
  probeSel.onchange = async () => { fillFields(); await draw(); };
  await loadRun();
  await draw();
  // TensorBoard's reload does not reach an iframed plugin: re-read every 30 s while the tab is visible
  // (the server answers from its cache unless the files grew).
  setInterval(() => { if (!document.hidden) draw(); }, 30000);
}
