"""Rebuild raysel/data/eval/{math,code,general}.jsonl: the demo's held-out eval sets for `raysel evaluate`.

From ../shared/data/pool.jsonl, the records of redistributable sources that are not in
raysel/data/demo.jsonl (by id, and by instruction lowercased with whitespace collapsed, the way
the evaluate stage checks), a seeded sample of 20 per set."""

import argparse
import json
import random
import re

REDISTRIBUTABLE = {"MIT", "Apache-2.0", "CC-BY-4.0"}
SETS = {
    "math": {"gsm8k"},
    "code": {"gpteacher_codegen", "humaneval"},
    "general": {"alpaca_eval_gpt4", "self_instruct_seed"},
}

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--pool", default="../shared/data/pool.jsonl")
parser.add_argument("--demo", default="raysel/data/demo.jsonl")
parser.add_argument("--out", default="raysel/data/eval")
parser.add_argument("--n", type=int, default=20)
args = parser.parse_args()


def key(record: dict) -> str:
    user = f"{record['instruction']}\n\n{record['input']}" if record.get("input", "").strip() else record["instruction"]
    return re.sub(r"\s+", " ", user).strip().lower()


demo = [json.loads(line) for line in open(args.demo)]
taken = {r["id"] for r in demo} | {key(r) for r in demo}
pool = [json.loads(line) for line in open(args.pool)]
rng = random.Random(20261206)
for name, sources in SETS.items():
    fresh = [r for r in pool if r["source"] in sources and r["license"] in REDISTRIBUTABLE
             and r["id"] not in taken and key(r) not in taken]  # fmt: skip
    picked = rng.sample(fresh, args.n)
    taken |= {r["id"] for r in picked} | {key(r) for r in picked}
    with open(f"{args.out}/{name}.jsonl", "w") as f:
        for record in picked:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{name}: {len(picked)} of {len(fresh)} held-out records -> {args.out}/{name}.jsonl")
