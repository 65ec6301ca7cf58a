"""Rebuild raysel/data/demo.jsonl from ../shared/data/pool.jsonl.

A seeded sample of about 1,000 records, proportional per source, from the
sources whose licence allows redistribution in an open-source package."""

import argparse
import collections
import json
import random

REDISTRIBUTABLE = {"MIT", "Apache-2.0", "CC-BY-4.0"}

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--pool", default="../shared/data/pool.jsonl")
parser.add_argument("--out", default="raysel/data/demo.jsonl")
parser.add_argument("--n", type=int, default=1000)
args = parser.parse_args()

by_source = collections.defaultdict(list)
with open(args.pool) as f:
    for line in f:
        record = json.loads(line)
        if record["license"] in REDISTRIBUTABLE:
            by_source[record["source"]].append(record)
total = sum(len(v) for v in by_source.values())
rng = random.Random(20261123)
picked = []
for source in sorted(by_source):
    records = by_source[source]
    picked += rng.sample(records, max(1, round(args.n * len(records) / total)))
rng.shuffle(picked)
with open(args.out, "w") as f:
    for record in picked:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
print(f"{len(picked)} records from {len(by_source)} sources -> {args.out}")
