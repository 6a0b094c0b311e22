// cryo2d view: class gallery with click-to-select; Save writes what `cryo2d select` writes.
"use strict";
const state = { classes: [], selected: new Set(), total: 0 };
const $ = (id) => document.getElementById(id);

function fmtRes(r) { return r === null ? "-" : r.toFixed(1) + " \u00c5"; }

function render() {
  const grid = $("grid");
  const key = $("sort").value;
  const order = [...state.classes];
  const cmp = {
    number: (a, b) => a.number - b.number,
    count: (a, b) => b.count - a.count || a.number - b.number,
    resolution: (a, b) => (a.resolution ?? Infinity) - (b.resolution ?? Infinity) || a.number - b.number,
    junk: (a, b) => a.junk - b.junk || a.number - b.number,
  }[key];
  order.sort(cmp);
  grid.replaceChildren(...order.map(tile));
  summary();
}

function tile(c) {
  const div = document.createElement("div");
  div.className = "tile" + (state.selected.has(c.number) ? " selected" : "") + (c.count === 0 ? " empty" : "");
  div.dataset.class = c.number;
  div.tabIndex = 0;
  div.setAttribute("role", "checkbox");
  div.setAttribute("aria-checked", state.selected.has(c.number));
  div.title = `class ${c.number}: ${c.count} particles, ${fmtRes(c.resolution)}, junk score ${c.junk}`;
  const img = document.createElement("img");
  img.src = `/class/${c.number}.png`;
  img.alt = `class ${c.number}`;
  const label = document.createElement("div");
  label.className = "label";
  label.innerHTML = `<span><b>#${c.number}</b> n=${c.count} (${(100 * c.fraction).toFixed(1)}%)</span><span>${fmtRes(c.resolution)}</span>`;
  const junk = document.createElement("div");
  junk.className = "junk" + (c.auto ? "" : " high");
  junk.textContent = `junk ${c.junk.toFixed(2)}`;
  div.append(img, label, junk);
  const toggle = () => {
    if (state.selected.has(c.number)) state.selected.delete(c.number); else state.selected.add(c.number);
    div.classList.toggle("selected", state.selected.has(c.number));
    div.setAttribute("aria-checked", state.selected.has(c.number));
    summary();
  };
  div.addEventListener("click", toggle);
  div.addEventListener("keydown", (e) => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); toggle(); } });
  return div;
}

function summary() {
  const chosen = state.classes.filter((c) => state.selected.has(c.number));
  const n = chosen.reduce((s, c) => s + c.count, 0);
  const pct = state.total ? (100 * n / state.total).toFixed(1) : "0.0";
  $("summary").textContent = `${chosen.length} of ${state.classes.length} classes selected: ${n} of ${state.total} particles (${pct}%)`;
}

function setSelection(numbers) { state.selected = new Set(numbers); render(); }

async function save() {
  const status = $("status");
  const button = $("save");
  button.disabled = true;
  status.className = "";
  status.textContent = "saving\u2026";
  try {
    const classes = [...state.selected].sort((a, b) => a - b);
    const response = await fetch("/api/save", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ classes }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    status.textContent = body.summary;
  } catch (err) {
    status.className = "error";
    status.textContent = "save failed: " + err.message;
  } finally {
    button.disabled = false;
  }
}

async function load() {
  const response = await fetch("/api/classes");
  const data = await response.json();
  state.classes = data.classes;
  state.total = data.classes.reduce((s, c) => s + c.count, 0);
  $("job").textContent = `${data.job} \u2192 saves to ${data.out}`;
  render();
  document.body.dataset.ready = "1";
}

$("sort").addEventListener("change", render);
$("select-auto").addEventListener("click", () => setSelection(state.classes.filter((c) => c.auto).map((c) => c.number)));
$("select-all").addEventListener("click", () => setSelection(state.classes.filter((c) => c.count > 0).map((c) => c.number)));
$("select-none").addEventListener("click", () => setSelection([]));
$("save").addEventListener("click", save);
load();
