"""The run's layout: every folder and marker name, relative to the output root, in one place.

prepared/              the validated, rendered samples (parquet)
rejects/               every input row that was not kept, with its reason (JSON lines);
                       rejects/encode-<shard>.jsonl: the samples the encoder could not take
features/              the feature store (parquet shards), and features/_done/ its shard markers
stats/                 per-feature statistics, top-activating spans, and each sample's activated
                       features at the statistics' tau (stats/activated.parquet, what select reads)
selection/<method>/    one committed selection per method
fac/                   FAC of the input against an anchor
synthesis/             FAC Synthesis's candidates
evaluate/              proxy fine-tunes: adapters/<method>/<seed>/ (peft), results.parquet, summary.json,
                       sets/<name>/ (the eval sets, prepared) and _done/ (a marker per fine-tune and set)
stages/<stage>.json    each stage's completion marker, written last
<side set>/            a side set (targets, anchor, ...) encoded with the same layout
manifest.json          the run's manifest, written when the run finishes
"""

from __future__ import annotations

import posixpath

PREPARED = "prepared"
REJECTS = "rejects"
FEATURES = "features"
FEATURES_DONE = "features/_done"
SPAN_CANDIDATES = "features/_spans"  # per shard, each feature's top samples with their windows
DENSE = "features/_dense"  # per shard, encode.keep_dense's (id, dense) vectors
STATS = "stats"
FEATURE_STATS = "stats/features.parquet"
STATS_SUMMARY = "stats/summary.json"
ACTIVATED = "stats/activated.parquet"
SPANS = "stats/spans.parquet"
SELECTION = "selection"
FAC = "fac"
SYNTHESIS = "synthesis"
EVALUATE = "evaluate"
MANIFEST = "manifest.json"
STAGE_MARKERS = "stages"


def demo_data() -> str:
    """The bundled demo corpus: 1,000 instruction rows (data/SOURCES.md)."""
    from importlib import resources

    return str(resources.files("raysel") / "data" / "demo.jsonl")


def reference_data() -> str:
    """FAC's default reference: 1,930 rows of P3, a broad public mix of prompted NLP tasks, disjoint
    from the demo corpus and ../shared/data (data/SOURCES.md)."""
    from importlib import resources

    return str(resources.files("raysel") / "data" / "reference.jsonl")


def demo_eval_sets() -> list[dict]:
    """The demo's held-out eval sets for `raysel demo --evaluate` (data/eval/, disjoint from demo.jsonl)."""
    from importlib import resources

    folder = resources.files("raysel") / "data" / "eval"
    return [{"name": name, "paths": [str(folder / f"{name}.jsonl")]} for name in ("math", "code", "general")]


def marker(stage: str) -> str:
    """The completion marker of a stage: it exists, with the stage's resume key, once the stage is done."""
    return posixpath.join(STAGE_MARKERS, f"{stage}.json")


def selection(method: str, *parts: str) -> str:
    return posixpath.join(SELECTION, method, *parts)


def shard_marker(shard: str) -> str:
    return posixpath.join(FEATURES_DONE, f"{shard}.json")


def encode_rejects(shard: str) -> str:
    return posixpath.join(REJECTS, f"encode-{posixpath.splitext(shard)[0]}.jsonl")
