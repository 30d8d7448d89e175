"""GET /dashboard: the jobs to look at, in a browser.

Two server-rendered pages with a little JavaScript and nothing fetched from
outside. The list: jobs with their state, progress bars and rates (items per
second since the job started), refreshed every second, and the presets with
their lineage (base preset, producing job, final loss). A job's page: timings, its events, a preview of its results and errors
and, for a fit job (a fine-tuning job too), the loss per step as an inline SVG plot, with the
validation loss at each checkpoint and the checkpoints marked. The pages hold no
data: their script reads the same JSON endpoints as every client (/v1/jobs...,
/v1/presets) with the bearer token the user types in, kept in the tab's
sessionStorage, so a tenant sees only its own jobs, exactly as the API decides.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(prefix="/dashboard", include_in_schema=False)

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.bar { width: 160px; height: 12px; background: #eee; border-radius: 3px; overflow: hidden; display: inline-block; }
.bar > div { height: 100%; background: #3a7; }
#error { color: #b00; } svg { border: 1px solid #ddd; background: #fcfcfc; }
"""

# Shared by both pages: the token form and an authenticated fetch.
COMMON_SCRIPT = """
const tokenKey = "lmq-token";
function token() { return sessionStorage.getItem(tokenKey) || ""; }
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(tokenKey, document.getElementById("token").value);
  refresh();
});
async function api(path) {
  const headers = token() ? {Authorization: "Bearer " + token()} : {};
  const response = await fetch(path, {headers});
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  document.getElementById("error").textContent = "";
  return body;
}
function cell(row, text) { const td = row.insertCell(); td.textContent = text ?? ""; return td; }
function bar(fraction) {
  const outer = document.createElement("span"); outer.className = "bar";
  const inner = document.createElement("div"); inner.style.width = (100 * fraction).toFixed(1) + "%";
  outer.appendChild(inner); outer.dataset.progress = fraction; return outer;
}
// Items (prompts, or a fit's steps) per second since the job started, until it ended.
function rate(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  const seconds = (end - Date.parse(job.started_at)) / 1000;
  return seconds > 0 ? (job.counts.completed + job.counts.failed) / seconds : null;
}
function every(seconds, work) {
  const run = () => work().catch((error) => { document.getElementById("error").textContent = error.message; });
  window.refresh = run; run(); setInterval(run, seconds * 1000);
}
"""

LIST_SCRIPT = """
every(1, async () => {
  const page = await api("/v1/jobs?limit=100");
  const body = document.getElementById("jobs");
  body.replaceChildren();
  for (const job of page.jobs) {
    const row = body.insertRow(); row.dataset.job = job.id; row.className = "job";
    const link = document.createElement("a");
    link.href = "/dashboard/jobs/" + job.id; link.textContent = job.id.slice(0, 12);
    row.insertCell().appendChild(link);
    cell(row, job.kind);
    const status = cell(row, job.status); status.className = "status"; status.dataset.state = job.status;
    cell(row, job.preset);
    row.insertCell().appendChild(bar(job.progress));
    cell(row, job.counts.completed + job.counts.failed + " / " + job.counts.total);
    const perSecond = rate(job);
    cell(row, perSecond === null ? "" : perSecond.toFixed(2) + "/s").dataset.rate = perSecond ?? "";
    cell(row, job.created_at);
  }
  const presets = document.getElementById("presets");
  presets.replaceChildren();
  for (const preset of (await api("/v1/presets")).presets) {
    const row = presets.insertRow(); row.dataset.preset = preset.name; row.className = "preset";
    cell(row, preset.name); cell(row, preset.architecture); cell(row, preset.parent || preset.source);
    const made = row.insertCell();
    if (preset.job_id) {
      const link = document.createElement("a"); link.href = "/dashboard/jobs/" + preset.job_id;
      link.textContent = preset.job_id.slice(0, 12); made.appendChild(link);
    }
    const loss = preset.details.final_loss;
    cell(row, loss === undefined || loss === null ? "" : loss.toFixed(4)).dataset.loss = loss ?? "";
  }
});
"""

JOB_SCRIPT = """
const jobId = document.body.dataset.job, PREVIEW = 5;
// A fit job's training loss per step (blue), its validation loss at each checkpoint (orange), and
// each checkpoint (the end of an epoch) as a dashed line at its step.
function lossPlot(steps, checkpoints) {
  const svg = document.getElementById("loss");
  svg.replaceChildren();
  if (!steps.length) return;
  const [width, height, pad] = [600, 240, 30];
  const valid = checkpoints.filter((c) => c.val_loss !== null && c.val_loss !== undefined);
  const losses = [...steps.map((s) => s.loss), ...valid.map((c) => c.val_loss)];
  const low = Math.min(...losses), high = Math.max(...losses);
  const lastStep = Math.max(...steps.map((s) => s.step), ...checkpoints.map((c) => c.step));
  const x = (step) => pad + (width - 2 * pad) * (lastStep > 1 ? (step - 1) / (lastStep - 1) : 0.5);
  const y = (loss) => height - pad - (height - 2 * pad) * (high > low ? (loss - low) / (high - low) : 0.5);
  const ns = "http://www.w3.org/2000/svg";
  function draw(tag, attributes, data = {}) {
    const element = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
    Object.assign(element.dataset, data);
    svg.appendChild(element);
    return element;
  }
  for (const c of checkpoints) {
    draw("line", {x1: x(c.step), x2: x(c.step), y1: pad, y2: height - pad, stroke: "#999", "stroke-dasharray": "4 3",
      class: "checkpoint"}, {step: c.step, epoch: c.epoch});
  }
  const series = [[steps.map((s) => [s.step, s.loss]), "#37a", "step"], [valid.map((c) => [c.step, c.val_loss]), "#d73", "valid"]];
  for (const [points, color, kind] of series) {
    draw("polyline", {points: points.map(([step, loss]) => x(step) + "," + y(loss)).join(" "), fill: "none", stroke: color});
    for (const [step, loss] of points) {
      draw("circle", {cx: x(step), cy: y(loss), r: 3, fill: color, class: kind}, {step, loss});
    }
  }
  draw("text", {x: pad, y: 16}).textContent =
    "loss " + high.toFixed(3) + " (top) to " + low.toFixed(3) + ", steps 1 to " + lastStep;
  const legend = [valid.length ? "orange: validation loss" : "", checkpoints.length ? "dashed: checkpoints" : ""];
  draw("text", {x: pad, y: height - 8}).textContent = legend.filter(Boolean).join("; ");
}
every(1, async () => {
  const job = await api("/v1/jobs/" + jobId);
  document.getElementById("status").textContent = job.status;
  document.getElementById("progress").replaceChildren(bar(job.progress));
  for (const field of ["kind", "preset", "created_at", "started_at", "finished_at", "error", "output_preset"]) {
    document.getElementById(field).textContent = job[field] ?? "";
  }
  const events = (await api("/v1/jobs/" + jobId + "/events")).events;
  const body = document.getElementById("events");
  body.replaceChildren();
  for (const event of events) {
    const {id, type, created_at, ...data} = event;
    const row = body.insertRow(); cell(row, created_at); cell(row, type); cell(row, JSON.stringify(data));
  }
  lossPlot(
    events.filter((e) => e.type === "step" && e.loss !== null && e.loss !== undefined),
    events.filter((e) => e.type === "epoch" && e.step !== undefined),
  );
  if (job.kind === "generate" && job.finished_at && !document.getElementById("results").rows.length) {
    await showResults();
  }
});
async function showResults() {
  // The first few result lines, once the job has ended (the endpoint streams them all).
  const headers = token() ? {Authorization: "Bearer " + token()} : {};
  const lines = (await (await fetch("/v1/jobs/" + jobId + "/results", {headers})).text()).split("\\n");
  const body = document.getElementById("results");
  for (const line of lines.filter(Boolean).slice(0, PREVIEW)) {
    const result = JSON.parse(line);
    const row = body.insertRow(); row.className = "result";
    cell(row, result.custom_id ?? result.index); cell(row, result.output); cell(row, result.finish_reason);
    cell(row, result.error);
  }
}
"""


def page(title: str, content: str, script: str, **data: str) -> HTMLResponse:
    attributes = "".join(f' data-{name}="{escape(value)}"' for name, value in data.items())
    return HTMLResponse(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>
<body{attributes}>
<h1>{escape(title)}</h1>
<form id="token-form"><label>Token <input id="token" type="password" autocomplete="off"></label>
<button type="submit">Use</button></form>
<p id="error"></p>
{content}
<script>{COMMON_SCRIPT}{script}</script>
</body></html>"""
    )


@router.get("", response_class=HTMLResponse)
def job_list() -> HTMLResponse:
    table = """<table><thead><tr><th>job</th><th>kind</th><th>state</th><th>preset</th><th>progress</th>
<th>done</th><th>rate</th><th>created</th></tr></thead><tbody id="jobs"></tbody></table>
<h2>Presets</h2><table><thead><tr><th>name</th><th>architecture</th><th>base</th><th>made by job</th>
<th>final loss</th></tr></thead><tbody id="presets"></tbody></table>"""
    return page("lmq jobs", table, LIST_SCRIPT)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> HTMLResponse:
    fields = "".join(
        f'<tr><th>{name.replace("_", " ")}</th><td id="{name}"></td></tr>'
        for name in ("status", "kind", "preset", "created_at", "started_at", "finished_at", "output_preset", "error")
    )
    content = f"""<p><a href="/dashboard">all jobs</a></p>
<table>{fields}<tr><th>progress</th><td id="progress"></td></tr></table>
<h2>Loss per step, validation loss and checkpoints</h2><svg id="loss" width="600" height="240"></svg>
<h2>Results (first 5)</h2><table><thead><tr><th>input</th><th>output</th><th>finish</th><th>error</th></tr></thead>
<tbody id="results"></tbody></table>
<h2>Events</h2><table><thead><tr><th>at</th><th>type</th><th>data</th></tr></thead>
<tbody id="events"></tbody></table>"""
    return page(f"lmq job {job_id[:12]}", content, JOB_SCRIPT, job=job_id)
