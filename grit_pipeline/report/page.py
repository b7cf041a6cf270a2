"""Renders the report's single self-contained HTML page (inline CSS, inline SVG, base64 images, a few
lines of inline JS for the layer toggle; a Content-Security-Policy forbids any network access).

Jinja2 autoescaping escapes every caption, key, detail and config value: captions are web text and may
contain `<script>` or tag-like strings. Before that, every value the template prints goes through
`schemas.display.display_text` (the environment's `finalize`), so control characters and bidirectional
overrides show as visible escapes (`\x1b`, `\u202e`) instead of reordering or hiding text; only the
run.yaml block keeps its line breaks (`multiline`). Values marked safe (our CSS, JS and SVG) are left alone.
"""

from __future__ import annotations

import jinja2
from markupsafe import Markup, escape

from schemas.display import display_text

_CSS = r"""
:root { --fg:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc; --card:#fff; --accent:#2563eb; --bad:#dc2626; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#0f172a; color:#f8fafc; padding:18px 28px 14px; }
header h1 { margin:0 0 4px; font-size:20px; font-weight:600; }
header .sub { color:#cbd5e1; font-size:13px; word-break:break-all; }
header .chips { margin-top:10px; display:flex; flex-wrap:wrap; gap:6px; }
.chip { display:inline-block; padding:2px 8px; border-radius:999px; background:#1e293b; color:#e2e8f0;
        font-size:12px; font-family:ui-monospace,SFMono-Regular,Menlo,monospace; }
nav { position:sticky; top:0; z-index:5; background:#fff; border-bottom:1px solid var(--line); padding:8px 28px; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-weight:500; }
main { padding:8px 28px 40px; max-width:1500px; }
h2 { font-size:17px; margin:26px 0 10px; }
h3 { font-size:15px; margin:18px 0 8px; }
.hint { color:var(--muted); font-size:13px; margin:-4px 0 10px; }
table { border-collapse:collapse; background:var(--card); }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { font-weight:600; font-size:12px; color:#374151; background:#f1f5f9; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
.funnel { width:100%; border:1px solid var(--line); }
.bar { height:10px; width:160px; background:#fee2e2; border-radius:3px; overflow:hidden; margin-top:4px; }
.bar > span { display:block; height:100%; background:#22c55e; }
.reason { display:inline-block; margin:1px 4px 1px 0; padding:1px 7px; border-radius:4px; background:#fef2f2;
          color:#991b1b; font-size:12px; white-space:nowrap; }
.reason b { font-weight:600; }
.plots { display:grid; grid-template-columns:repeat(auto-fill,minmax(390px,1fr)); gap:14px; }
.plotcard { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 12px; margin:0; }
.plotcard figcaption { font-weight:600; font-size:13px; margin-bottom:4px; }
.plotcard svg.plot { width:100%; height:auto; display:block; }
.kept { width:100%; }
.kept td, .kept th { padding:3px 10px; }
.kept tr.current td { background:#fef9c3; font-weight:600; }
.toolbar { display:flex; align-items:center; gap:8px; margin:0 0 12px; flex-wrap:wrap; }
.toolbar button { border:1px solid #cbd5e1; background:#fff; padding:5px 12px; border-radius:6px; cursor:pointer;
                  font:inherit; font-size:13px; }
.toolbar button[aria-pressed="true"] { background:var(--accent); border-color:var(--accent); color:#fff; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill,minmax(380px,1fr)); gap:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; overflow:hidden; }
.figure { position:relative; background:#0f172a; line-height:0; }
.figure img, .figure .placeholder { width:100%; height:auto; display:block; }
.figure .placeholder { background:repeating-linear-gradient(45deg,#e5e7eb 0 10px,#f3f4f6 10px 20px); }
.figure .noimg { position:absolute; left:8px; bottom:8px; line-height:1.3; background:#fff; padding:2px 6px;
                 border-radius:4px; font-size:11px; color:var(--bad); max-width:90%; }
svg.overlay { position:absolute; inset:0; width:100%; height:100%; }
svg.overlay rect.box { fill:none; stroke-width:2.5; vector-effect:non-scaling-stroke; }
svg.overlay g[data-layer="candidates"] rect.box { stroke-width:1.4; stroke-dasharray:4 3; opacity:.9; }
svg.overlay text { font:600 12px system-ui,sans-serif; fill:#fff; stroke:#000; stroke-width:3px;
                   paint-order:stroke; stroke-linejoin:round; }
svg.overlay g.layer { display:none; }
body[data-layer="candidates"] svg.overlay g[data-layer="candidates"],
body[data-layer="selected"] svg.overlay g[data-layer="selected"],
body[data-layer="final"] svg.overlay g[data-layer="final"] { display:inline; }
.body { padding:10px 12px 12px; }
.meta { display:flex; justify-content:space-between; gap:8px; color:var(--muted); font-size:12px; }
.meta code { color:#374151; }
.counts span { margin-left:8px; }
.counts span.on { color:var(--fg); font-weight:600; }
.dropped { display:inline-block; margin-top:6px; padding:1px 7px; border-radius:4px; background:#fef2f2;
           color:#991b1b; font-size:12px; }
.caption { font-size:15px; margin:8px 0; }
.caption mark { border-radius:3px; padding:0 2px; color:#111; }
.exprs { margin:4px 0 6px; font-size:12px; color:#374151; }
.exprs span { display:inline-block; border-left:4px solid; padding:0 6px; margin:2px 6px 2px 0; background:#f8fafc; }
.label { font-size:11px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); margin-top:8px; }
pre.text { margin:2px 0 0; padding:6px 8px; background:#f1f5f9; border-radius:6px; white-space:pre-wrap;
           word-break:break-word; font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace; }
details.rejects { background:var(--card); border:1px solid var(--line); border-radius:8px; margin:6px 0; }
details.rejects summary { cursor:pointer; padding:8px 12px; font-weight:500; }
details.rejects summary .n { color:var(--muted); font-weight:400; margin-left:6px; }
details.rejects table { width:100%; border-top:1px solid var(--line); }
details.rejects td.key { font-family:ui-monospace,monospace; white-space:nowrap; }
ul.logs { margin:4px 0 10px; padding-left:20px; }
ul.logs code, p code { color:var(--muted); font-size:12px; word-break:break-all; }
.failures td { font-size:12px; }
details.sample { margin:0 0 12px; }
details.sample summary { cursor:pointer; color:var(--muted); font-size:13px; }
details.sample td code { font-size:12px; word-break:break-all; }
details.config pre { background:#fff; border:1px solid var(--line); padding:10px; border-radius:6px; overflow:auto; }
footer { color:var(--muted); font-size:12px; padding:20px 28px; }
"""

_JS = r"""
(function () {
  var buttons = document.querySelectorAll('.toolbar button[data-show]');
  function show(layer) {
    document.body.setAttribute('data-layer', layer);
    buttons.forEach(function (b) { b.setAttribute('aria-pressed', String(b.dataset.show === layer)); });
    document.querySelectorAll('.counts span').forEach(function (s) {
      s.classList.toggle('on', s.dataset.layer === layer);
    });
  }
  buttons.forEach(function (b) { b.addEventListener('click', function () { show(b.dataset.show); }); });
  document.addEventListener('keydown', function (e) {
    var i = ['1', '2', '3'].indexOf(e.key);
    if (i >= 0 && buttons[i]) { show(buttons[i].dataset.show); }
  });
  show(document.body.getAttribute('data-layer'));
})();
"""

_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<link rel="icon" href="data:,">
<title>GrIT report · {{ run_name }}</title>
<style>{{ css|safe }}</style>
</head>
<body data-layer="{{ layers[-1][0] if layers else 'final' }}">
<header>
  <h1>GrIT run report</h1>
  <div class="sub">{{ run_uri }}</div>
  <div class="chips">
    <span class="chip">{{ "{:,}".format(totals[0]) }} rows in → {{ "{:,}".format(totals[1]) }} {{ "GrIT rows" if last_stage == "compose" else "rows out of " ~ last_stage }}</span>
    {% for k, v in chips %}<span class="chip">{{ k }}={{ v }}</span>{% endfor %}
  </div>
</header>
<nav><a href="#funnel">Funnel</a><a href="#plots">Plots</a><a href="#gallery">Gallery</a><a href="#rejects">Rejects</a><a href="#runlog">Run log</a><a href="#config">Config</a></nav>
<main>

<section id="funnel">
<h2>Funnel</h2>
<p class="hint">Rows entering and leaving each stage, summed over {{ shards }} committed source shard(s); every dropped row is counted under its reason.</p>
<table class="funnel">
<thead><tr><th>stage</th><th class="num">shards</th><th class="num">rows in</th><th class="num">rows out</th>
<th class="num">rejected</th><th>kept</th><th>rejected by reason</th><th class="num">seconds</th></tr></thead>
<tbody>
{% for f in funnel %}
<tr data-stage="{{ f.stage }}">
  <td><b>{{ f.stage }}</b></td>
  <td class="num" data-field="shards">{{ f.shards }}</td>
  <td class="num" data-field="rows_in">{{ f.rows_in }}</td>
  <td class="num" data-field="rows_out">{{ f.rows_out }}</td>
  <td class="num" data-field="rejected">{{ f.rejected }}</td>
  <td>{{ "%.1f"|format(100 * f.kept_share) }}%<div class="bar"><span style="width:{{ "%.1f"|format(100 * f.kept_share) }}%"></span></div></td>
  <td>{% for reason, n in f.rejects.items() %}<span class="reason" data-reason="{{ reason }}" data-count="{{ n }}">{{ reason }} <b>{{ n }}</b></span>{% else %}<span class="hint">none</span>{% endfor %}{% for name, n in f.counters.items() %}<div class="hint" data-counter="{{ name }}" data-count="{{ n }}">{{ name }} {{ "{:,}".format(n) }} (rows kept)</div>{% endfor %}</td>
  <td class="num" data-field="seconds">{{ "%.2f"|format(f.seconds) }}</td>
</tr>
{% endfor %}
</tbody>
</table>
</section>

<section id="plots">
<h2>Plots</h2>
<p class="hint">{{ plots_note }}</p>
<details class="sample" id="sample" data-complete="{{ 'true' if sample.complete else 'false' }}" data-seed="{{ sample.seed }}">
<summary>Shards read for the plots, gallery and reject examples</summary>
<table>
<thead><tr><th>stage</th><th class="num">read</th><th class="num">committed</th><th>shards read</th></tr></thead>
<tbody>
{% for stage, shards in sample_rows %}
<tr data-stage="{{ stage }}" data-sampled="{{ shards.sampled }}" data-committed="{{ shards.committed }}"><td>{{ stage }}</td><td class="num">{{ "{:,}".format(shards.sampled) }}</td><td class="num">{{ "{:,}".format(shards.committed) }}</td><td><code>{{ shards.shards }}</code></td></tr>
{% endfor %}
</tbody></table>
</details>
<div class="plots">
{% for p in plots %}
<figure class="plotcard" data-plot="{{ p.name }}"><figcaption>{{ p.title }}</figcaption>{{ p.svg|safe }}</figure>
{% endfor %}
{% if kept_table %}
<figure class="plotcard"><figcaption>Captions kept by select.min_score</figcaption>
<table class="kept">
<thead><tr><th class="num">min_score</th><th class="num">captions kept</th><th class="num">share</th></tr></thead>
<tbody>
{% for t in kept_table %}
<tr class="{{ 'current' if t.current else '' }}" data-threshold="{{ t.threshold }}" data-kept="{{ t.kept }}">
<td class="num">{{ t.threshold }}{% if t.current %} (current){% endif %}</td>
<td class="num">{{ "{:,}".format(t.kept) }} / {{ "{:,}".format(t.total) }}</td>
<td class="num">{{ "%.1f"|format(100 * t.share) }}%</td></tr>
{% endfor %}
</tbody></table>
</figure>
{% endif %}
</div>
</section>

<section id="gallery">
<h2>Gallery</h2>
<p class="hint">{{ gallery|length }} rows sampled deterministically (seed {{ seed }}) from the rows {{ "the detector saw" if gallery_stage == "detect" else "of " ~ gallery_stage }} in {{ sample.describe(gallery_stage) if gallery_stage else "no shard" }}. Colours follow the noun chunks marked in each caption.{% if layers %} Keys {{ "1" if layers|length == 1 else "1–%d"|format(layers|length) }} switch box layers.{% endif %}</p>
{% if layers %}
<div class="toolbar">
{% for layer, title in layers %}
  <button type="button" data-show="{{ layer }}" aria-pressed="{{ 'true' if loop.last else 'false' }}">{{ loop.index }} · {{ title }}</button>
{% endfor %}
</div>
{% endif %}
<div class="gallery">
{% for it in gallery %}
<article class="card" data-key="{{ it.key }}" data-shard="{{ it.shard }}">
  <div class="figure">
    {% if it.image_uri %}<img class="thumb" src="{{ it.image_uri }}" width="{{ it.view_w }}" height="{{ it.view_h }}" alt="image of row {{ it.key }}">
    {% else %}<svg class="placeholder" viewBox="0 0 {{ it.view_w }} {{ it.view_h }}"></svg><span class="noimg">{{ it.image_error }}</span>{% endif %}
    <svg class="overlay" viewBox="0 0 {{ it.view_w }} {{ it.view_h }}" preserveAspectRatio="none">
    {% for layer, boxes in it.layers.items() if layer in layer_names %}
      <g class="layer" data-layer="{{ layer }}">
      {% for b in boxes %}
        {% set x = b.x1 * it.view_w %}{% set y = b.y1 * it.view_h %}
        <rect class="box" x="{{ "%.1f"|format(x) }}" y="{{ "%.1f"|format(y) }}" width="{{ "%.1f"|format((b.x2 - b.x1) * it.view_w) }}" height="{{ "%.1f"|format((b.y2 - b.y1) * it.view_h) }}" stroke="{{ b.color }}"><title>{{ b.label }}</title></rect>
        {% if layer != "candidates" %}<text x="{{ "%.1f"|format(x + 3) }}" y="{{ "%.1f"|format(y + 14 if y < it.view_h - 20 else y - 4) }}">{{ b.label }}</text>{% endif %}
      {% endfor %}
      </g>
    {% endfor %}
    </svg>
  </div>
  <div class="body">
    <div class="meta"><code>{{ it.key }}</code><span class="counts">
      {% for layer, _ in layers %}{% set n = it.layer_totals[layer] %}<span data-layer="{{ layer }}">{{ n }} {{ layer_words[layer] if n == 1 else layer }}</span>{% endfor %}</span></div>
    {% if it.layer_totals.candidates > it.layers.candidates|length %}<div class="hint">showing the best {{ it.layers.candidates|length }} candidate boxes</div>{% endif %}
    {% if it.dropped %}<div class="dropped">dropped at {{ it.dropped.stage }}: {{ it.dropped.reason }}{% if it.dropped.detail %} — {{ it.dropped.detail }}{% endif %}</div>{% endif %}
    <div class="caption">{% for p in it.pieces %}{% if p.chunk is not none %}<mark data-chunk="{{ p.chunk }}" style="background:{{ p.color }}55;box-shadow:inset 0 -2px {{ p.color }}">{{ p.text }}</mark>{% else %}{{ p.text }}{% endif %}{% endfor %}</div>
    {% if it.expressions %}<div class="exprs">{% for text, color in it.expressions %}<span style="border-color:{{ color }}">{{ text }}</span>{% endfor %}</div>{% endif %}
    {% if it.grounded_caption is not none %}
    <div class="label">grounded caption</div><pre class="text grounded">{{ it.grounded_caption }}</pre>
    <div class="label">markdown caption</div><pre class="text markdown">{{ it.markdown_caption }}</pre>
    {% endif %}
  </div>
</article>
{% endfor %}
</div>
</section>

<section id="rejects">
<h2>Rejects</h2>
<p class="hint">Dropped rows by stage and reason (counted over every shard), with up to {{ examples_per_reason }} examples each{% if not sample.complete %} from the sampled shards{% endif %}. Show all with <code>grit inspect RUN --stage STAGE --rejects</code>.</p>
{% for stage, groups in rejects %}
<h3>{{ stage }}</h3>
{% for g in groups %}
<details class="rejects" data-stage="{{ g.stage }}" data-reason="{{ g.reason }}">
<summary>{{ g.reason }}<span class="n">{{ "{:,}".format(g.count) }} rows</span></summary>
<table><thead><tr><th>key</th><th class="num">shard</th><th>detail</th><th>caption</th></tr></thead><tbody>
{% for e in g.examples %}<tr><td class="key">{{ e.key }}</td><td class="num">{{ e.shard }}</td><td>{{ e.detail }}</td><td>{{ e.caption if e.caption is not none else "" }}</td></tr>{% else %}{% if g.stage in sample.sampled %}<tr><td colspan="4" class="hint">No example in the {{ sample.describe(g.stage) }} read; <code>grit inspect RUN --stage {{ g.stage }} --rejects --reason {{ g.reason }}</code> finds them.</td></tr>{% endif %}{% endfor %}
</tbody></table>
</details>
{% endfor %}
{% else %}
<p>No rows were rejected.</p>
{% endfor %}
</section>

<section id="runlog">
<h2>Run log</h2>
{% if run_log.logs %}
<p class="hint">The log of each <code>grit run</code> into this directory, by start time (UTC).</p>
<ul class="logs">
{% for l in run_log.logs %}<li><a href="{{ l.href }}" data-log="{{ l.name }}">{{ l.name }}</a> <code>{{ l.url }}</code></li>
{% endfor %}
</ul>
{% else %}
<p class="hint">No run logs in this run directory.</p>
{% endif %}
{% set fl = run_log.failures %}
{% if fl.count %}
<p data-failures="{{ fl.count }}"><b>{{ "{:,}".format(fl.count) }}</b> shard failure(s) recorded in <a href="{{ fl.href }}">failures.jsonl</a> <code>{{ fl.url }}</code>{% for stage, n in fl.by_stage %}<span class="reason" data-stage="{{ stage }}" data-count="{{ n }}">{{ stage }} <b>{{ n }}</b></span>{% endfor %}</p>
<table class="failures">
<thead><tr><th>time</th><th>stage</th><th class="num">shard</th><th>key</th><th>error</th><th>message</th></tr></thead>
<tbody>
{% for f in fl.latest %}<tr data-stage="{{ f.stage }}" data-shard="{{ f.shard }}"><td>{{ f.time }}</td><td>{{ f.stage }}</td><td class="num">{{ f.shard }}</td><td class="key">{{ f.key if f.key is not none else "" }}</td><td>{{ f.error_type if f.error_type is not none else "" }}</td><td>{{ f.message }}</td></tr>
{% endfor %}
</tbody></table>
{% if fl.count > fl.latest|length %}<p class="hint">The latest {{ fl.latest|length }} shown; every failure, with its traceback, is in failures.jsonl.</p>{% endif %}
{% else %}
<p data-failures="0">No shard failures recorded.</p>
{% endif %}
</section>

<section id="config">
<h2>Config</h2>
<details class="config"><summary>run.yaml</summary><pre>{{ config_yaml|multiline }}</pre></details>
</section>
</main>
<footer>grit-pipeline report · {{ run_name }}</footer>
<script>{{ js|safe }}</script>
</body>
</html>
"""

def _displayed(value):
    """Every printed value: untrusted text made visible-safe; Markup (our own CSS, JS, SVG) untouched."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return display_text(value)


def _multiline(value: str) -> Markup:
    """Multi-line text (run.yaml): escaped for display and HTML, line breaks kept."""
    return Markup(escape(display_text(value, keep="\n")))


_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          finalize=_displayed)
_ENV.filters["multiline"] = _multiline
PAGE = _ENV.from_string(_TEMPLATE)


# Box layers of the gallery: (layer, button title, stage whose output it shows)
LAYERS = (("candidates", "Candidates (before NMS)", "detect"),
          ("selected", "Selected (after threshold + NMS)", "select"),
          ("final", "Final GrIT boxes", "compose"))
_LAYER_WORDS = {"candidates": "candidate", "selected": "selected", "final": "final"}


def render_page(*, stages: list[str], **context) -> str:
    """The page; `stages` are the stages with output in the run (layers and plots of others are left out)."""
    layers = [(layer, title) for layer, title, stage in LAYERS if stage in stages]
    sample_rows = list(context["sample"].to_json()["stages"].items())
    return PAGE.render(css=_CSS, js=_JS, layers=layers, layer_names=[name for name, _ in layers],
                       layer_words=_LAYER_WORDS, last_stage=stages[-1] if stages else "", sample_rows=sample_rows,
                       **context)
