"""`raysel status RUN_DIR_OR_S3_URI`: where a run stands, read from its output root alone.

Every stage commits a marker last, and the encode stage one per shard, so the root says what is
done without asking the driver: it works while a run is in progress, from any machine that can
read the root. The encode rate and ETA come from the shard markers' times."""

from __future__ import annotations

import json
import posixpath
import time
from datetime import datetime

from raysel.core import paths
from raysel.core.storage import Storage
from raysel.pipeline import PLAN, VERBS
from raysel.stages.base import closure

# The plan's stages in order, with the numbers of each record a person looks for; those `raysel run`
# reaches are shown as pending before they run.
BRIEF = {cls.name: cls.brief for cls, _ in PLAN}
CORE = {cls.name for cls in closure([cls for cls, _ in PLAN], VERBS["run"])}


def run_status(storage: Storage, now: float | None = None) -> dict:
    """Per stage: done, in progress or pending, with what its marker or shard markers say."""
    now = time.time() if now is None else now
    markers = {posixpath.basename(i.path).removesuffix(".json"): i for i in storage.listing(paths.STAGE_MARKERS)}
    stages = {}
    for name in BRIEF:
        info = markers.get(name)
        if info is not None:
            record = storage.read_json(paths.marker(name)) or {}
            stages[name] = {"state": "done", "finished": info.mtime.timestamp(), **brief(name, record)}
        elif name in CORE:
            stages[name] = {"state": "pending"}
    if stages["encode"]["state"] != "done":
        stages["encode"] = encode_progress(storage, stages["prepare"], now)
    manifest = storage.read_json(paths.MANIFEST)
    return {"root": storage.uri(), "finished": manifest is not None, "stages": stages}


def brief(name: str, record: dict) -> dict:
    """The few numbers of a stage's summary a person looks for."""
    return {k: record[k] for k in (*BRIEF[name], "seconds") if k in record}


def encode_progress(storage: Storage, prepare: dict, now: float) -> dict:
    """Shards k/N and samples from the shard markers of the newest encode; rate and ETA from their times."""
    total_shards = sum(i.path.endswith(".parquet") for i in storage.listing(paths.PREPARED))
    infos = [i for i in storage.listing(paths.FEATURES_DONE) if i.path.endswith(".json")]
    shards = [(i.mtime.timestamp(), json.loads(data)) for i, data in zip(infos, storage.read_files(infos))]
    if shards:  # markers of an earlier input or config do not count: the stage redoes those
        newest = max(shards, key=lambda s: s[0])[1].get("key")
        shards = [s for s in shards if s[1].get("key") == newest]
    out = {"state": "in progress" if shards else "pending", "shards_done": len(shards), "shards": total_shards}
    if prepare["state"] != "done" or not shards:
        return out
    done = sum(s[1].get("rows", 0) + s[1].get("rejected", 0) for s in shards)
    total, start, last = prepare.get("n_valid", 0), prepare["finished"], max(s[0] for s in shards)
    rate = done / max(last - start, 1e-9)
    out |= {"samples_done": done, "samples": total, "samples_per_s": round(rate, 2), "last_commit": last}
    out["eta_s"] = round(max(0.0, last + (total - done) / rate - now)) if rate > 0 else None
    return out


def status_lines(status: dict, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    lines = [f"raysel status {status['root']}: " + ("finished" if status["finished"] else "not finished")]
    for name, s in status["stages"].items():
        lines.append(f"  {name:<10} {s['state']:<12}{describe(name, s, now)}".rstrip())
    return lines + [json.dumps(status)]


def describe(name: str, s: dict, now: float) -> str:
    if s["state"] == "pending" and name != "encode":
        return ""
    if s["state"] == "done":
        when = datetime.fromtimestamp(s["finished"]).strftime("%Y-%m-%d %H:%M:%S")
        facts = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("state", "finished", "seconds"))
        return f"{facts}; {s.get('seconds', '?')} s, done {when}"
    text = f"shards {s['shards_done']}/{s['shards']}"
    if "samples_done" in s:
        eta = "unknown" if s["eta_s"] is None else f"{s['eta_s']:,} s"
        text += (
            f", samples {s['samples_done']:,}/{s['samples']:,}, {s['samples_per_s']:,.1f} samples/s, ETA {eta}"
            f" (last shard committed {now - s['last_commit']:,.0f} s ago)"
        )
    return text
