"""Rebuild raysel/data/reference.jsonl, FAC's default reference set: a generic instruction mix that F
(the anchor's task features) is enriched against.

The rows are P3, the prompted mixture T0 was trained on (BigScience's public prompt templates over
38 English NLP datasets), as self-instruct's repository ships it: 200 prompt/completion pairs per
template, one file per template, under data/finetuning/t0_train_50k/data_per_template/. A seeded
sample of --per-template rows from every template, so that no task dominates. Rows whose normalised
prompt is an instruction of the demo corpus, its eval sets or ../shared/data are left out (the reference must be
disjoint from the data the benchmarks measure).

    git clone https://github.com/yizhongw/self-instruct && git -C self-instruct checkout 0b26cca
    python scripts/make_reference_data.py --repo self-instruct
"""

import argparse
import json
import random
import re
from pathlib import Path

COMMIT = "0b26ccaa415992100fa32df62d41b994cf928e23"
TEMPLATES = "data/finetuning/t0_train_50k/data_per_template"


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="a checkout of yizhongw/self-instruct at " + COMMIT[:7])
    parser.add_argument("--out", default="raysel/data/reference.jsonl")
    parser.add_argument("--per-template", type=int, default=7)
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[
            str(p)
            for p in [*Path("raysel/data").glob("**/*.jsonl"), *Path("../shared/data").glob("*.jsonl")]
            if p.name != "reference.jsonl"
        ],  # fmt: skip
    )
    args = parser.parse_args()

    seen = set()
    for path in args.exclude:
        for line in open(path):  # not splitlines: it also splits at U+2028 inside a string
            record = json.loads(line)
            seen.add(normalised(f"{record['instruction']}\n{record.get('input') or ''}".strip()))
    rows, rng = [], random.Random(20261207)
    for file in sorted(Path(args.repo, TEMPLATES).glob("*.jsonl")):
        pairs = [json.loads(line) for line in open(file) if line.strip()]
        kept = 0
        for n in rng.sample(range(len(pairs)), len(pairs)):
            prompt, completion = (
                pairs[n]["prompt"].strip(),
                re.sub(r"<\|endoftext\|>$", "", pairs[n]["completion"]).strip(),
            )
            if not prompt or not completion or normalised(prompt) in seen:
                continue
            seen.add(normalised(prompt))
            rows.append({"id": f"p3_{file.stem}_{n:03d}", "instruction": prompt, "input": "", "output": completion,
                         "source": f"p3:{file.stem}", "category": "nlp_task", "license": "Apache-2.0"})  # fmt: skip
            kept += 1
            if kept == args.per_template:
                break
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows from {len(list(Path(args.repo, TEMPLATES).glob('*.jsonl')))} templates -> {args.out}")


if __name__ == "__main__":
    main()
