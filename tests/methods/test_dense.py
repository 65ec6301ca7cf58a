"""The dense-embedding diversity baseline: its theta filter against the rule read literally, and the
method through the select stage against hidden states taken one sample at a time from the full model."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysel.config import RunConfig
from raysel.core.encoder import Encoder
from raysel.core.features import seeded_hash
from raysel.core.models import load_model, tokenize
from raysel.methods.dense import cosine_filter
from raysel.pipeline import run


def literally(vectors, visit, theta) -> list[int]:
    """The rule as written: keep x unless cos(x, y) >= theta for some kept y, over all pairs."""
    kept = []
    for i in visit:
        if all(float(vectors[i] @ vectors[j]) < theta for j in kept):
            kept.append(int(i))
    return kept


@pytest.mark.parametrize("seed", range(4))
def test_the_filter_keeps_the_budget_at_the_smallest_theta_that_reaches_it(seed):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(60, 6)).astype(np.float32)
    vectors[40:50] = vectors[:10]  # exact duplicates: never both kept below theta 1
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    visit = rng.permutation(60)
    kept, theta, passes = cosine_filter(vectors, visit, 25)
    assert len(kept) == 25 and passes > 1
    assert kept.tolist() == literally(vectors, visit, theta)[:25]
    assert len(literally(vectors, visit, theta - 2e-4)) < 25  # the smallest such theta, to the precision
    assert not any(i in kept and i + 40 in kept for i in range(10))


@pytest.mark.parametrize("keep_dense", [False, True])
def test_dense_picks_from_mean_pooled_hidden_states_at_the_hook(stats_run, tmp_path, keep_dense):
    """Would catch: vectors pooled over other positions than the encoder's, and, read from the encode pass
    (encode.keep_dense), vectors paired with the wrong ids (the encoder's length buckets reorder a shard)."""
    shared, cfg, _ = stats_run
    root = tmp_path / "run"  # a copy: the shared run's select stays pending for the tests that read it
    if not keep_dense:
        shutil.copytree(shared, root)
    raw = json.loads(cfg.model_dump_json()) | {"select": {"methods": ["dense"], "budget": 10}, "s3": {}}
    raw["output"], raw["encode"]["keep_dense"] = {"root": str(root)}, keep_dense
    run(RunConfig.model_validate(raw), until="select")
    selected = pq.read_table(root / "selection" / "dense" / "selected.parquet")["id"].to_pylist()
    manifest = json.loads((root / "selection" / "dense" / "manifest.json").read_text())
    assert manifest["vectors"] == ("the encode pass" if keep_dense else "a pass of its own")
    # one sample at a time, no padding, from the full model's hidden_states after the hook's block
    stack = cfg.stack()
    encoder = Encoder(stack)
    model = load_model(stack.model, "cpu")
    prepared = pq.read_table(root / "prepared", columns=["id", "text"]).sort_by("id")
    vectors, counted = [], []
    for text in prepared["text"].to_pylist():
        seq = tokenize(encoder.tokenizer, [text], truncation=True, max_length=stack.prepare.max_tokens)["input_ids"][0]
        first = int(encoder._first_counted([seq])[0])
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[encoder.layer + 1]
        mean = hidden[0, first:].mean(0)
        vectors.append((mean / mean.norm()).numpy())
        counted.append(len(seq) - first)  # the store's n_tokens: samples are visited longest first
    ids = np.asarray(prepared["id"].to_pylist(), dtype=object)
    visit = np.lexsort((seeded_hash(ids, cfg.select.seed), -np.array(counted)))  # equal lengths: the seeded hash
    kept, theta, _ = cosine_filter(np.stack(vectors), visit, 10)
    assert len(selected) == 10 and selected == ids[kept].tolist()
    assert manifest["theta"] == pytest.approx(theta, abs=2e-4)
