"""The run report: one self-contained report.html (no network needed to view it) next to a
run's results, and report.json, the numbers behind it, for scripts.

It shows the run summary (counts, rejects by reason, model and SAE, stage timings,
config), plots (coverage against budget per method, feature document frequency,
token lengths of the pool against the selection, task scores and IGDS deltas),
the features the selection covers most and the pool features it misses, each
with its top-activating spans (the peak token marked), and a page of the
selected samples with their gains and top features. Sections keep their size
when a run lacks their data, so the page never jumps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import posixpath

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysel.config import RunConfig
from raysel.core import paths
from raysel.core.features import FeatureStore, is_active
from raysel.core.storage import Storage
from raysel.methods import METHODS
from raysel.stages.spans import find_spans

log = logging.getLogger(__name__)


def run_config(manifest: dict) -> RunConfig:
    """The run's config from its manifest; masked keys are dropped, so the AWS environment supplies them."""
    config = json.loads(json.dumps(manifest["config"]))
    for key in ("access_key", "secret_key"):
        config.get("s3", {}).pop(key, None)
    return RunConfig.model_validate(config)


def selections(storage: Storage) -> dict[str, dict]:
    """Every committed selection of the run (its manifest exists), by method."""
    found = {}
    selector = pafs.FileSelector(storage.path(paths.SELECTION), allow_not_found=True)
    for info in storage.fs.get_file_info(selector):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and storage.exists(paths.selection(name, "manifest.json")):
            found[name] = storage.read_json(paths.selection(name, "manifest.json"))
    return dict(sorted(found.items()))


def report_data(storage: Storage, n_features: int = 20, page: int = 50) -> dict:
    manifest = storage.read_json(paths.MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"{storage.uri()}: no manifest.json; is it the output root of a finished run?")
    cfg = run_config(manifest)
    stages, picked = manifest["stages"], selections(storage)
    tau = stages.get("stats", {}).get("tau", cfg.activation.tau)
    stats = pq.read_table(storage.path(paths.FEATURE_STATS), columns=["feature", "doc_freq"], filesystem=storage.fs)
    doc_freq = stats["doc_freq"].to_numpy()
    lengths = pq.read_table(storage.path(paths.PREPARED), columns=["id", "n_tokens"], filesystem=storage.fs)
    primary = "coverage" if "coverage" in picked else next((m for m in picked if m != "synthesis"), None)
    data = {
        "output": storage.uri(),
        "model": manifest.get("model"),
        "counts": manifest["counts"],
        "sae": stages.get("encode", {}).get("sae"),
        "layer": stages.get("encode", {}).get("layer"),
        "tau": tau,
        "timings": timings(stages),
        "config": manifest["config"],
        "primary": primary,
        "curves": {m: s["objective_curve"] for m, s in picked.items() if "objective_curve" in s},
        "coverage_at_budget": {
            m: s["coverage_at_budget"].get(m) for m, s in picked.items() if "coverage_at_budget" in s
        },
        "doc_freq": doc_freq.tolist(),
        "pool_tokens": lengths["n_tokens"].to_pylist(),
        "scores": {
            m: pq.read_table(
                storage.path(paths.selection(m, "selected.parquet")), columns=["gain"], filesystem=storage.fs
            )["gain"].to_pylist()
            for m in picked
            if m in METHODS and METHODS[m].ranks_by_score
        },
        "igds_effects": next((s["feature_effects"] for s in picked.values() if "feature_effects" in s), []),
        "selected_tokens": [],
        "features": [],
        "samples": [],
    }
    if primary:
        data |= selection_detail(cfg, storage, manifest, primary, tau, doc_freq, lengths, n_features, page)
    return data


def timings(stages: dict) -> list[dict]:
    rows = []
    for name, s in stages.items():
        n = s.get("n_input") or s.get("n_encoded") or s.get("n_samples")
        if s.get("seconds") is not None:
            rows.append(
                {
                    "stage": name,
                    "seconds": s["seconds"],
                    "samples": n,
                    "samples_per_s": round(n / s["seconds"], 1) if n and s["seconds"] else None,
                }
            )
    return rows


def selection_detail(
    cfg: RunConfig,
    storage: Storage,
    manifest: dict,
    method: str,
    tau: float,
    doc_freq: np.ndarray,
    lengths,
    n_features: int,
    page: int,
) -> dict:
    """What the primary selection covers and misses, with spans, and a page of its samples."""
    selected = pq.read_table(storage.path(paths.selection(method, "selected.parquet")), filesystem=storage.fs)
    ids = selected["id"].to_pylist()
    store = FeatureStore(storage).table(["id", "feat_ids", "feat_max"], ids=ids)
    by_id = {
        i: (f, v)
        for i, f, v in zip(store["id"].to_pylist(), store["feat_ids"].to_pylist(), store["feat_max"].to_pylist())
    }
    hits = np.zeros(doc_freq.size, np.int64)
    for f, v in by_id.values():
        hits[np.asarray(f, np.int64)[is_active(np.asarray(v), tau)]] += 1
    covered = [j for j in np.lexsort((np.arange(hits.size), -hits)) if hits[j] > 0][:n_features]
    missed = [j for j in np.lexsort((np.arange(hits.size), -doc_freq)) if doc_freq[j] > 0 and hits[j] == 0][:n_features]
    spans = find_spans(cfg.stack(), cfg.stats.top_n, storage, [int(j) for j in covered + missed])
    span_rows: dict[int, list] = {}
    for r in spans.to_pylist():
        span_rows.setdefault(r["feature"], []).append(r)
    features = [
        {
            "feature": int(j),
            "status": status,
            "doc_freq": int(doc_freq[j]),
            "selected": int(hits[j]),
            "spans": [
                {k: r[k] for k in ("id", "value", "tokens", "acts", "peak")} for r in span_rows.get(int(j), [])[:3]
            ],
        }
        for status, group in (("covered", covered), ("missed", missed))
        for j in group
    ]
    texts = pq.ParquetDataset(
        storage.path(paths.PREPARED), filesystem=storage.fs, filters=pc.field("id").isin(ids[:page])
    ).read(columns=["id", "text"])
    records = dict(zip(texts["id"].to_pylist(), texts["text"].to_pylist()))
    n_tokens = dict(zip(lengths["id"].to_pylist(), lengths["n_tokens"].to_pylist()))
    samples = []
    for r in selected.slice(0, page).to_pylist():
        f, v = by_id.get(r["id"], ([], []))
        top = [int(j) for _, j in sorted(zip(v, f), key=lambda p: (-p[0], p[1]))[:5]]
        samples.append(
            {
                "rank": r["rank"],
                "id": r["id"],
                "gain": None if r["gain"] != r["gain"] else r["gain"],
                "new_features": r["new_features"],
                "top_features": top,
                "text": records.get(r["id"], "")[:400],
            }
        )
    return {"features": features, "samples": samples, "selected_tokens": [n_tokens[i] for i in ids if i in n_tokens]}


def figure(draw, has_data: bool, title: str) -> str:
    """One plot as an embedded PNG, always 640x360 so the page keeps its layout; a placeholder without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if has_data:
        draw(ax)
    else:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes, color="#777")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return (
        f'<img class="plot" width="640" height="360" alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    )


def plots(data: dict) -> list[str]:
    def curves(ax):
        for method, curve in data["curves"].items():
            ax.plot([p["k"] for p in curve], [p["coverage"] for p in curve], marker=".", label=method)
        ax.set_xlabel("samples selected")
        ax.set_ylabel("share of activated features covered")
        ax.legend(fontsize=8)

    def doc_freq(ax):
        df = np.array([d for d in data["doc_freq"] if d > 0])
        ax.hist(df, bins=np.logspace(0, np.log10(df.max() + 1), 30))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples activating the feature")
        ax.set_ylabel("features")

    def lengths(ax):
        bins = np.linspace(0, max(data["pool_tokens"]) + 1, 40)
        ax.hist(data["pool_tokens"], bins=bins, density=True, alpha=0.5, label="pool")
        ax.hist(data["selected_tokens"], bins=bins, density=True, alpha=0.5, label=f"{data['primary']} selection")
        ax.set_xlabel("tokens")
        ax.legend(fontsize=8)

    def scores(ax):
        for method, values in data["scores"].items():
            ax.hist(values, bins=30, alpha=0.6, label=method)
        ax.set_xlabel("score of the selected samples")
        ax.legend(fontsize=8)

    def deltas(ax):
        effects = data["igds_effects"]
        ax.bar(
            [str(e["feature"]) for e in effects],
            [e["delta"] for e in effects],
            color=["#2a7" if e["delta"] > 0 else "#c44" for e in effects],
        )
        ax.set_xlabel("candidate feature")
        ax.set_ylabel("delta of the task metric")
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)

    return [
        figure(curves, bool(data["curves"]), "Feature coverage against budget"),
        figure(doc_freq, any(d > 0 for d in data["doc_freq"]), "Feature document frequency"),
        figure(lengths, bool(data["pool_tokens"]) and bool(data["selected_tokens"]), "Token lengths"),
        figure(scores, bool(data["scores"]), "Task scores (mona, igds)"),
        figure(deltas, bool(data["igds_effects"]), "IGDS: delta per candidate feature"),
    ]


def span_html(span: dict) -> str:
    pieces = [
        f"<mark>{html.escape(t)}</mark>" if i == span["peak"] else html.escape(t) for i, t in enumerate(span["tokens"])
    ]
    return f'<div class="span"><span class="val">{span["value"]:.2f}</span> {"".join(pieces)}</div>'


def render(data: dict) -> str:
    e = html.escape
    counts = data["counts"]
    rejected = (
        "".join(f"<li>{e(r)}: {n:,}</li>" for r, n in sorted(counts.get("rejected_by_reason", {}).items()))
        or "<li>none</li>"
    )
    timing_rows = "".join(
        f"<tr><td>{e(t['stage'])}</td><td>{t['seconds']}</td><td>{t['samples'] or ''}</td>"
        f"<td>{t['samples_per_s'] or ''}</td></tr>"
        for t in data["timings"]
    )
    method_rows = "".join(
        f"<tr><td>{e(m)}</td><td>{c if c is not None else ''}</td></tr>" for m, c in data["coverage_at_budget"].items()
    )
    feature_rows = "".join(
        f'<tr><td data-v="{f["feature"]}">{f["feature"]}</td><td>{f["status"]}</td><td data-v="{f["doc_freq"]}">'
        f'{f["doc_freq"]}</td><td data-v="{f["selected"]}">{f["selected"]}</td>'
        f"<td>{''.join(span_html(s) for s in f['spans'])}</td></tr>"
        for f in data["features"]
    )
    sample_rows = "".join(
        f"<tr><td>{s['rank']}</td><td>{e(s['id'])}</td><td>{'' if s['gain'] is None else round(s['gain'], 4)}</td>"
        f'<td>{s["new_features"]}</td><td>{", ".join(map(str, s["top_features"]))}</td><td class="text">{e(s["text"])}</td></tr>'
        for s in data["samples"]
    )
    return PAGE.format(
        output=e(data["output"]),
        model=e(str(data["model"])),
        sae=e(str(data["sae"])),
        layer=data["layer"],
        tau=data["tau"],
        n_input=counts["n_input"],
        n_valid=counts.get("n_valid", ""),
        n_rejected=counts.get("n_rejected", 0),
        n_encoded=counts.get("n_encoded", ""),
        rejected=rejected,
        timings=timing_rows,
        methods=method_rows,
        primary=e(str(data["primary"])),
        plots="".join(f"<figure>{p}</figure>" for p in plots(data)),
        features=feature_rows or '<tr><td colspan="5">no selection in this run</td></tr>',
        samples=sample_rows or '<tr><td colspan="6">no selection in this run</td></tr>',
        config=e(json.dumps(data["config"], indent=2)),
    )


def write_report(storage: Storage) -> str:
    """Write report.html and report.json at the run's root; returns the page's location."""
    data = report_data(storage)
    storage.write_json("report.json", data)
    with storage.fs.open_output_stream(storage.path("report.html")) as f:
        f.write(render(data).encode())
    log.info("report: %s", storage.uri("report.html"))
    return storage.uri("report.html")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>raysel report: {output}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ddd; padding: 4px 8px;
  vertical-align: top; font-size: 13px; }} th {{ background: #f4f4f4; cursor: pointer; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, 640px); gap: 12px; }}
figure {{ margin: 0; width: 640px; height: 360px; }} img.plot {{ display: block; }}
.span {{ font-family: monospace; white-space: pre-wrap; margin-bottom: 4px; }} .val {{ color: #777; }}
mark {{ background: #ffd54f; font-weight: bold; }} td.text {{ font-family: monospace; white-space: pre-wrap;
  max-width: 600px; }} #search {{ padding: 4px; width: 320px; }} pre {{ background: #f8f8f8; padding: 1em; }}
</style></head><body>
<h1>raysel run report</h1>
<section id="summary"><h2>Run</h2>
<p>Output: <code>{output}</code><br>Model: <code>{model}</code>, SAE: <code>{sae}</code> (layer {layer}), τ = {tau:.4g}</p>
<table><tr><th>input rows</th><th>valid</th><th>rejected</th><th>encoded</th></tr>
<tr><td>{n_input}</td><td>{n_valid}</td><td>{n_rejected}</td><td>{n_encoded}</td></tr></table>
<p>Rejected by reason:</p><ul>{rejected}</ul>
<table><tr><th>stage</th><th>seconds</th><th>samples</th><th>samples/s</th></tr>{timings}</table>
<table><tr><th>method</th><th>feature coverage at its budget</th></tr>{methods}</table></section>
<section id="plots"><h2>Plots</h2><div class="plots">{plots}</div></section>
<section id="features-section"><h2>Features of the <code>{primary}</code> selection</h2>
<p>The features it covers most, then the pool features it misses, with their top-activating spans (peak token marked).</p>
<input id="search" placeholder="search features and spans">
<table id="features"><thead><tr><th>feature</th><th>status</th><th>doc freq</th><th>selected samples</th><th>spans</th></tr>
</thead><tbody>{features}</tbody></table></section>
<section id="samples"><h2>Selected samples (<code>{primary}</code>, first page)</h2>
<table><tr><th>rank</th><th>id</th><th>gain / score</th><th>new features</th><th>top features</th><th>text</th></tr>{samples}</table>
</section>
<section id="config"><h2>Config</h2><pre>{config}</pre></section>
<script>
const table = document.getElementById("features");
document.getElementById("search").addEventListener("input", e => {{
  const q = e.target.value.toLowerCase();
  for (const row of table.tBodies[0].rows) row.style.display = row.textContent.toLowerCase().includes(q) ? "" : "none";
}});
table.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {{
  const rows = Array.from(table.tBodies[0].rows), up = th.dataset.dir !== "asc";
  const key = r => {{ const c = r.cells[col]; return c && c.dataset.v !== undefined ? Number(c.dataset.v) : (c ? c.textContent : ""); }};
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1));
  th.dataset.dir = up ? "asc" : "desc";
  rows.forEach(r => table.tBodies[0].appendChild(r));
}}));
</script></body></html>
"""
