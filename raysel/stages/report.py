"""The run report: one self-contained report.html (no network needed to view it) next to a
run's results, and report.json, the numbers behind it, for scripts.

It shows the run summary (counts, rejects by reason, model and SAE, stage timings,
config), plots (coverage against budget per method, feature document frequency,
token lengths of the pool against the selection, the scores of methods that rank by one, and each
method's own figures: IGDS's deltas),
the features the selection covers most and the pool features it misses, each
with its top-activating spans (the peak token marked), and a page of the
selected samples with their scores and top features, and the methods side by side. A panel
without data in this run is left out, not drawn empty.
"""

from __future__ import annotations

import base64
import dataclasses
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
from raysel.core.features import FeatureStore
from raysel.core.storage import Storage
from raysel.methods import METHODS
from raysel.stages.base import Done, Stage
from raysel.stages.select import run_counts

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


def report_data(storage: Storage, manifest: dict, page: int = 50) -> dict:
    """The report's numbers from the run's records (`manifest`: config, model, counts and the stages'
    records, as the run manifest holds them) and its outputs."""
    stages, picked = manifest["stages"], selections(storage)
    tau = stages["stats"]["tau"]
    stats = pq.read_table(storage.path(paths.FEATURE_STATS), columns=["feature", "doc_freq"], filesystem=storage.fs)
    doc_freq = stats["doc_freq"].to_numpy()
    lengths = pq.read_table(storage.path(paths.PREPARED), columns=["id", "n_tokens"], filesystem=storage.fs)
    primary = stages["spans"]["primary"]
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
        # histograms and top-N lists only: report.json stays small at a million rows
        "doc_freq": log_histogram(doc_freq[doc_freq > 0]),
        "scores": {
            m: histogram(
                pq.read_table(
                    storage.path(paths.selection(m, "selected.parquet")), columns=["score"], filesystem=storage.fs
                )["score"].to_numpy(zero_copy_only=False),
                30,
            )
            for m in picked
            if m in METHODS and METHODS[m].ranks_by_score
        },
        # each method's own figures of what it settled on (IGDS: its interventions' deltas)
        "figures": [dataclasses.asdict(b) for m, s in picked.items() if m in METHODS for b in METHODS[m].figures(s)],
        "methods": side_by_side(storage, picked, lengths),
        "evaluate": stages.get("evaluate", {}).get("summary"),  # the proxy fine-tunes, when `raysel evaluate` ran
        "features": [],
        "samples": [],
    }
    selected_tokens = np.zeros(0)
    if primary:
        detail = selection_detail(storage, stages["spans"], doc_freq, lengths, page)
        selected_tokens = np.asarray(detail.pop("selected_tokens"), np.float64)
        data |= detail
    pool_tokens = lengths["n_tokens"].to_numpy().astype(np.float64)
    edges = np.linspace(0, pool_tokens.max() + 1 if pool_tokens.size else 1, 41)
    data["token_lengths"] = {
        "edges": edges.tolist(),
        "pool": np.histogram(pool_tokens, edges)[0].tolist(),
        "selected": np.histogram(selected_tokens, edges)[0].tolist(),
    }
    return data


def histogram(values: np.ndarray, bins: int) -> dict:
    """Counts in equal bins over the values' range (NaN, a method's missing score, left out)."""
    values = values[~np.isnan(values.astype(np.float64))] if values.size else values
    counts, edges = np.histogram(values, bins=bins) if values.size else (np.zeros(0, int), np.zeros(0))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def log_histogram(values: np.ndarray, bins: int = 30) -> dict:
    """Counts in log-spaced bins from 1 (document frequencies span orders of magnitude)."""
    if not values.size:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=np.logspace(0, np.log10(values.max() + 1), bins + 1))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def side_by_side(storage: Storage, picked: dict[str, dict], lengths) -> dict:
    """Per method: budget, picks, coverage at its budget, mean tokens and score of its picks, and the
    share of its picks each other method also made."""
    rows, ids = {}, {}
    for m, manifest in picked.items():
        table = pq.read_table(storage.path(paths.selection(m, "selected.parquet")), filesystem=storage.fs)
        ids[m] = set(table["id"].to_pylist())
        scores = [g for g in table["score"].to_pylist() if g is not None and g == g]
        tokens = lengths["n_tokens"].to_numpy()[
            pc.index_in(table["id"], value_set=lengths["id"]).drop_null().to_numpy()
        ]
        rows[m] = {
            "budget": manifest.get("budget"),
            "selected": table.num_rows,
            "coverage": (manifest.get("coverage_at_budget") or {}).get(m),
            "mean_tokens": round(float(np.mean(tokens)), 1) if tokens.size else None,
            "mean_score": round(float(np.mean(scores)), 4) if scores else None,
        }
    for m in rows:
        rows[m]["shared_with"] = {o: round(len(ids[m] & ids[o]) / max(len(ids[m]), 1), 3) for o in rows if o != m}
    return rows


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


def selection_detail(storage: Storage, shown: dict, doc_freq: np.ndarray, lengths, page: int) -> dict:
    """What the primary selection covers and misses (the spans stage's features, with their spans),
    and a page of its samples."""
    selected = pq.read_table(storage.path(paths.selection(shown["primary"], "selected.parquet")), filesystem=storage.fs)
    ids = selected["id"].to_pylist()
    page_rows = FeatureStore(storage).table(["id", "feat_ids", "feat_max"], ids=ids[:page])  # the page's samples alone
    by_id = dict(
        zip(page_rows["id"].to_pylist(), zip(page_rows["feat_ids"].to_pylist(), page_rows["feat_max"].to_pylist()))
    )
    covered, missed = shown["covered"], shown["missed"]
    spans = pq.read_table(storage.path(paths.SPANS), filesystem=storage.fs)
    span_rows: dict[int, list] = {}
    for r in spans.to_pylist():
        span_rows.setdefault(r["feature"], []).append(r)
    features = [
        {
            "feature": int(j),
            "status": status,
            "doc_freq": int(doc_freq[j]),
            "selected": shown["selected"].get(str(j), 0),  # a missed feature: 0
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
    samples = []
    for r in selected.slice(0, page).to_pylist():
        f, v = by_id.get(r["id"], ([], []))
        top = [int(j) for _, j in sorted(zip(v, f), key=lambda p: (-p[0], p[1]))[:5]]
        samples.append(
            {
                "rank": r["rank"],
                "id": r["id"],
                "score": None if r["score"] != r["score"] else r["score"],
                "new_features": r["new_features"],
                "top_features": top,
                "text": records.get(r["id"], "")[:400],
            }
        )
    rows = pc.index_in(selected["id"], value_set=lengths["id"]).drop_null().to_numpy()
    return {"features": features, "samples": samples, "selected_tokens": lengths["n_tokens"].to_numpy()[rows]}


def figure(draw, title: str) -> str:
    """One plot as an embedded PNG, 640x360."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    draw(ax)
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
        ax.stairs(data["doc_freq"]["counts"], data["doc_freq"]["edges"], fill=True)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples activating the feature")
        ax.set_ylabel("features")

    def lengths(ax):
        t = data["token_lengths"]
        for key, label in (("pool", "pool"), ("selected", f"{data['primary']} selection")):
            share = np.asarray(t[key], np.float64) / max(sum(t[key]), 1)
            ax.stairs(share, t["edges"], fill=True, alpha=0.5, label=label)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=8)

    def scores(ax):
        for method, h in data["scores"].items():
            ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.6, label=method)
        ax.set_xlabel("score of the selected samples")
        ax.legend(fontsize=8)

    def bars(b: dict):
        def draw(ax):
            ax.bar(b["labels"], b["values"], color=["#2a7" if v > 0 else "#c44" for v in b["values"]])
            ax.set_xlabel(b["xlabel"])
            ax.set_ylabel(b["ylabel"])
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)

        return draw

    panels = [
        *(
            (outcome(data["evaluate"], s, m), True, f"Proxy fine-tunes: {m} on {s} (95 % intervals over seeds)")
            for s, m in outcome_panels(data.get("evaluate"))
        ),
        (curves, bool(data["curves"]), "Feature coverage against budget"),
        (doc_freq, sum(data["doc_freq"]["counts"]) > 0, "Feature document frequency"),
        (lengths, sum(data["token_lengths"]["selected"]) > 0, "Token lengths"),
        (scores, any(h["counts"] for h in data["scores"].values()), f"Scores ({', '.join(data['scores'])})"),
        *((bars(b), bool(b["values"]), b["title"]) for b in data["figures"]),
    ]
    return [figure(draw, title) for draw, has_data, title in panels if has_data]  # no empty panels


def outcome_panels(summary: dict | None) -> list[tuple[str, str]]:
    """(eval set, metric) of every outcome plot: one per set and metric that has results."""
    if not summary:
        return []
    return sorted({(s, m) for sets in summary["by_method"].values() for s, metrics in sets.items() for m in metrics})


def outcome(summary: dict, s: str, metric: str):
    """Each method's mean over seeds with its interval, random in grey, the base model as a dashed line."""

    def draw(ax):
        rows = [(method, sets[s][metric]) for method, sets in summary["by_method"].items() if metric in sets.get(s, {})]
        for y, (method, e) in enumerate(rows):
            lo, hi = e["ci"] or (e["mean"], e["mean"])
            control = method in summary["controls"].values()
            ax.errorbar(e["mean"], y, xerr=[[e["mean"] - lo], [hi - e["mean"]]], fmt="o", capsize=3,
                        color="#888" if control else "#3b5bdb")  # fmt: skip
        base = summary["base"].get(s, {}).get(metric)
        if base is not None:
            ax.axvline(base, color="#c44", linestyle="--", label=f"base model {base:.4f}")
            ax.legend(fontsize=8)
        ax.set_yticks(range(len(rows)), [m for m, _ in rows], fontsize=8)
        ax.set_xlabel(f"{metric} ({summary['better'][metric]} is better)")

    return draw


def span_html(span: dict) -> str:
    pieces = [
        f"<mark>{html.escape(t)}</mark>" if i == span["peak"] else html.escape(t) for i, t in enumerate(span["tokens"])
    ]
    return f'<div class="span"><span class="val">{span["value"]:.2f}</span> {"".join(pieces)}</div>'


def render(data: dict) -> str:
    """The page: only the panels this run has data for."""
    primary = f"<code>{html.escape(str(data['primary']))}</code>"
    figures = plots(data)
    panels = [  # (has data, id, title, body)
        (data.get("evaluate"), "evaluate", "Proxy fine-tunes: each selection against random at its budget",
         lambda: outcome_html(data["evaluate"])),
        (data["methods"], "methods", "Methods side by side", lambda: methods_html(data["methods"])),
        (figures, "plots", "Plots", lambda: '<div class="plots">' + "".join(f"<figure>{f}</figure>" for f in figures) + "</div>"),
        (data["features"], "features-section", f"Features of the {primary} selection", lambda: features_html(data["features"])),
        (data["samples"], "samples", f"Selected samples ({primary}, first page)", lambda: samples_html(data["samples"])),
    ]  # fmt: skip
    sections = [summary_html(data)] + [card(id, title, body()) for present, id, title, body in panels if present]
    config = html.escape(json.dumps(data["config"], indent=2))
    sections.append(
        card("config", "Config", f"<details><summary>the resolved config</summary><pre>{config}</pre></details>")
    )
    return PAGE.format(output=html.escape(data["output"]), sections="\n".join(sections))


def card(id: str, title: str, body: str) -> str:
    return f'<section id="{id}" class="card"><h2>{title}</h2>{body}</section>'


def table(id: str, headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """A table whose headers sort it; `rows` hold (text, sort value or None) cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i in numeric else ''}{'' if v is None else f' data-v={v}'}>{t}</td>"
            for i, (t, v) in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{id}" class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def summary_html(data: dict) -> str:
    e, counts = html.escape, data["counts"]
    facts = [("input rows", counts["n_input"]), ("blank lines", counts.get("n_blank_lines", 0)),
             ("valid", counts.get("n_valid", "")), ("rejected", counts.get("n_rejected", 0)),
             ("encoded", counts.get("n_encoded", "")), ("encode errors", counts.get("n_encode_rejected", 0))]  # fmt: skip
    tiles = "".join(f'<div class="tile"><b>{v:,}</b>{k}</div>' if isinstance(v, int) else "" for k, v in facts)
    reasons = counts.get("rejected_by_reason", {})
    rejected = ", ".join(f"{e(r)} {n:,}" for r, n in sorted(reasons.items())) or "none"
    timing = table("timings", ["stage", "seconds", "samples", "samples/s"], [
        [(e(t["stage"]), None), (t["seconds"], t["seconds"]), (t["samples"] or "", t["samples"]),
         (t["samples_per_s"] or "", t["samples_per_s"])] for t in data["timings"]], {1, 2, 3})  # fmt: skip
    body = (
        f"<p>Output <code>{e(data['output'])}</code><br>Model <code>{e(str(data['model']))}</code>, "
        f"SAE <code>{e(str(data['sae']))}</code> (layer {data['layer']}), τ = {data['tau']:.4g}</p>"
        f'<div class="tiles">{tiles}</div><p>Rejected by reason: {rejected}</p>{timing}'
    )
    return card("summary", "Run", body)


def outcome_html(summary: dict) -> str:
    """One row per method, set and metric: the mean over seeds, its interval, and the paired difference
    against random on the same seeds (an interval that excludes 0 is a difference the seeds show)."""

    def ci(interval) -> str:
        return "" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"

    rows = [
        [(html.escape(method), None), (html.escape(s), None), (metric, None), (f"{e['mean']:.4f}", e["mean"]),
         (ci(e["ci"]), None), ("" if e.get("delta_vs_random") is None else f"{e['delta_vs_random']:+.4f}",
                               e.get("delta_vs_random")), (ci(e.get("delta_ci")), None), (e["n"], e["n"])]
        for method, sets in summary["by_method"].items() for s, metrics in sets.items() for metric, e in metrics.items()
    ]  # fmt: skip
    rows += [[("base model", None), (html.escape(s), None), (metric, None), (f"{v:.4f}", v), ("", None), ("", None),
              ("", None), ("", None)] for s, metrics in summary["base"].items() for metric, v in metrics.items()
             if v is not None]  # fmt: skip
    better = ", ".join(f"{m}: {b} is better" for m, b in summary["better"].items())
    return f"<p>{better}; delta = method - random.</p>" + table(
        "outcome", ["method", "eval set", "metric", "mean", "95 % interval", "delta vs random", "its interval",
                    "seeds"], rows, {3, 5, 7})  # fmt: skip


def methods_html(methods: dict) -> str:
    def num(v, fmt="{:,}"):
        return ("", None) if v is None else (fmt.format(v), v)

    rows = [
        [(f"<b>{html.escape(m)}</b>", None), num(r["budget"], "{:g}"), num(r["selected"]),
         num(r["coverage"], "{:.4f}"), num(r["mean_tokens"], "{:.1f}"), num(r["mean_score"], "{:.4f}"),
         (", ".join(f"{html.escape(o)} {v:.0%}" for o, v in r["shared_with"].items()), None)]
        for m, r in methods.items()
    ]  # fmt: skip
    headers = ["method", "budget", "selected", "feature coverage at its budget", "mean tokens", "mean score",
               "its picks that each other method also made"]  # fmt: skip
    return table("methods", headers, rows, {1, 2, 3, 4, 5})


def features_html(features: list[dict]) -> str:
    rows = [
        [(f["feature"], f["feature"]), (f["status"], None), (f["doc_freq"], f["doc_freq"]),
         (f["selected"], f["selected"]), ("".join(span_html(s) for s in f["spans"]), None)]
        for f in features
    ]  # fmt: skip
    return (
        "<p>The features it covers most, then the pool features it misses, with their top-activating spans "
        '(peak token marked). Click a header to sort.</p><input id="search" placeholder="search features and spans">'
        + table("features", ["feature", "status", "doc freq", "selected samples", "spans"], rows, {0, 2, 3})
    )


def samples_html(samples: list[dict]) -> str:
    rows = [
        [(s["rank"], s["rank"]), (html.escape(s["id"]), None),
         ("" if s["score"] is None else round(s["score"], 4), s["score"]), (s["new_features"], s["new_features"]),
         (", ".join(map(str, s["top_features"])), None), (f'<div class="text">{html.escape(s["text"])}</div>', None)]
        for s in samples
    ]  # fmt: skip
    return table("sample-table", ["rank", "id", "gain / score", "new features", "top features", "text"], rows,
                 {0, 2, 3})  # fmt: skip


class Report(Stage):
    """report.html and report.json at the run's root, from the records of the stages it shows."""

    name = "report"
    needs = ("prepare", "encode", "tau", "stats", "select", "spans")
    uses = ("evaluate",)  # its panel, when `raysel evaluate` ran (a run of other verbs fine-tunes nothing)
    brief = ("page",)

    def __init__(self, storage: Storage, run: dict):
        self.storage, self.run_info = storage, run  # run: the config, versions and model, as the manifest has them

    def key(self, done: Done) -> None:
        return None  # cheap, and `raysel report` asks for it again

    def run(self, done: Done) -> dict:
        manifest = self.run_info | {"output": self.storage.uri(), "counts": run_counts(done), "stages": done}
        return {"page": write_report(self.storage, manifest)}


def write_report(storage: Storage, manifest: dict) -> str:
    """Write report.html and report.json at the run's root; returns the page's location."""
    data = report_data(storage, manifest)
    storage.write_json("report.json", data)
    with storage.fs.open_output_stream(storage.path("report.html")) as f:
        f.write(render(data).encode())
    log.info("report: %s", storage.uri("report.html"))
    return storage.uri("report.html")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>raysel report: {output}</title>
<style>
:root {{ --ink: #1d2330; --muted: #5b6475; --line: #e3e6ec; --bg: #f5f6f8; --accent: #3b5bdb; }}
body {{ font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: var(--ink);
  background: var(--bg); }}
header {{ background: var(--ink); color: #fff; padding: 14px 32px; }} header h1 {{ margin: 0; font-size: 20px; }}
header code {{ color: #c5cdfa; }}
main {{ max-width: 1480px; margin: 0 auto; padding: 16px 32px 48px; }}
.card {{ background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 20px 16px;
  margin-top: 16px; box-shadow: 0 1px 2px rgba(0,0,0,.04); }}
h2 {{ font-size: 17px; margin: 10px 0 12px; }} code {{ font-size: 13px; }}
.tiles {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }}
.tile {{ border: 1px solid var(--line); border-radius: 6px; padding: 6px 14px; color: var(--muted);
  min-width: 110px; }} .tile b {{ display: block; font-size: 20px; color: var(--ink); }}
table {{ border-collapse: collapse; margin: 8px 0; }} #features, #sample-table {{ width: 100%; }}
th, td {{ border-bottom: 1px solid var(--line); padding: 6px 10px; vertical-align: top; font-size: 13px;
  text-align: left; }}
th {{ position: sticky; top: 0; background: #eef0f4; cursor: pointer; user-select: none; white-space: nowrap; }}
th[data-dir=asc]::after {{ content: " ▲"; }} th[data-dir=desc]::after {{ content: " ▼"; }}
tbody tr:nth-child(even) {{ background: #fafbfc; }} tbody tr:hover {{ background: #f0f3ff; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, 640px); gap: 12px; }}
figure {{ margin: 0; width: 640px; height: 360px; }} img.plot {{ display: block; }}
.span {{ font-family: ui-monospace, monospace; white-space: pre-wrap; margin-bottom: 4px; }}
.val {{ color: var(--muted); }} mark {{ background: #ffe066; font-weight: bold; border-radius: 2px; }}
.text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; max-width: 640px; max-height: 9em;
  overflow: auto; }}
#search {{ padding: 6px 10px; width: 340px; border: 1px solid var(--line); border-radius: 6px; }}
pre {{ background: var(--bg); padding: 1em; overflow: auto; }}
</style></head><body>
<header><h1>raysel run report <code>{output}</code></h1></header>
<main>
{sections}
</main>
<script>
const features = document.getElementById("features"), search = document.getElementById("search");
if (search) search.addEventListener("input", e => {{
  const q = e.target.value.toLowerCase();
  for (const row of features.tBodies[0].rows) row.style.display = row.textContent.toLowerCase().includes(q) ? "" : "none";
}});
document.querySelectorAll("table.sortable").forEach(table => table.querySelectorAll("th").forEach((th, col) =>
  th.addEventListener("click", () => {{
    const rows = Array.from(table.tBodies[0].rows), up = th.dataset.dir !== "asc";
    const key = r => {{ const c = r.cells[col]; return c.dataset.v !== undefined ? Number(c.dataset.v) : c.textContent; }};
    rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1));
    table.querySelectorAll("th").forEach(h => delete h.dataset.dir);
    th.dataset.dir = up ? "asc" : "desc";
    rows.forEach(r => table.tBodies[0].appendChild(r));
  }})));
</script></body></html>
"""
