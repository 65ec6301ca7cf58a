"""IGDS: frequency recall, the intervention hook, planted-feature recovery (tiny real models), and
the method end to end through the select stage."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysel.config import ModelConfig, RunConfig
from raysel.core.features import FeatureStore, seeded_hash
from raysel.core.models import load_model
from raysel.core.storage import Storage
from raysel.methods.igds import (
    IGDSConfig,
    Interventions,
    TaskMetric,
    against_null,
    amplified,
    decoder_layers,
    final_number,
    frequency_recall,
    null_grid,
)
from tests.conftest import build_tiny_sae, store_table


def test_frequency_recall_ranks_features_by_target_share_minus_pool_share():
    targets = store_table(
        [
            {"id": "a", "n_tokens": 1, "feats": {1: (2.0, 2.0), 2: (2.0, 2.0), 3: (0.5, 0.5)}},
            {"id": "b", "n_tokens": 1, "feats": {1: (2.0, 2.0), 3: (2.0, 2.0)}},
        ]
    )
    pool_doc_freq = np.array([5, 9, 0, 1, 3])  # of 10 pool samples
    got = frequency_recall(targets, tau=1.0, pool_doc_freq=pool_doc_freq, n_pool=10, n=3).to_pylist()
    # target shares above tau: 1 -> 1.0, 2 -> 0.5, 3 -> 0.5; lifts: 0.1, 0.5, 0.4; feature 0, 4 never fire on targets
    assert [r["feature"] for r in got] == [2, 3, 1]
    assert [round(r["lift"], 6) for r in got] == [0.5, 0.4, 0.1]


def test_final_number_reads_gsm8k_answers_and_plain_text():
    assert final_number("so 3 + 4 = 7.\n#### 1,234") == "1234"
    assert final_number("The answer is 42.") == "42" and final_number("no digits") is None


def test_amplification_adds_exactly_the_vector_on_counted_tokens_and_is_gone_after(tiny_model_dir):
    model = load_model(ModelConfig(name=str(tiny_model_dir), dtype="float32"), "cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    counted = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    vector = torch.randn(64)

    def after_layer_1():  # what block 2 receives: the residual stream after block 1
        seen = []
        probe = decoder_layers(model)[2].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=attention)
        probe.remove()
        return seen[0]

    base = after_layer_1()
    with amplified(model, 1, vector, counted):
        shifted = after_layer_1()
    torch.testing.assert_close(shifted - base, counted[..., None] * vector, rtol=0, atol=1e-5)
    assert not decoder_layers(model)[1]._forward_hooks
    assert torch.equal(after_layer_1(), base)

    # layer -1 (an SAE on blocks.0.hook_resid_pre): the shift lands on the embeddings, what block 0 reads
    def embeddings():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[0]

    with amplified(model, -1, vector, counted):
        moved = embeddings()
    torch.testing.assert_close(moved - embeddings(), counted[..., None] * vector, rtol=0, atol=1e-5)


def planted_sae(out, stack, igds, prompts, answers, planted: int):
    """The tiny SAE with decoder row `planted` set to the direction that most raises the answers'
    log-likelihood when added after layer 1 (the gradient); every other row stays random."""
    metric = TaskMetric(stack, igds, prompts, answers)
    shift = torch.zeros(64, requires_grad=True)
    handle = decoder_layers(metric.model)[1].register_forward_hook(
        lambda m, a, out: (out[0] + shift, *out[1:]) if isinstance(out, tuple) else out + shift
    )
    try:
        with torch.enable_grad():
            loss = 0.0
            for prompt, answer in zip(prompts, answers):
                p = metric.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                a = metric.tokenizer(answer + metric.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                logits = metric.model(input_ids=torch.tensor([p + a])).logits[0]
                logp = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(-1, torch.tensor(a)[:, None])
                loss = loss + logp.mean() / len(prompts)
            loss.backward()
    finally:
        handle.remove()
    build_tiny_sae(out)
    from sae_lens import SAE

    sae = SAE.load_from_disk(out)
    with torch.no_grad():
        sae.W_dec[planted] = shift.grad / shift.grad.norm()
    sae.save_model(out)
    return out


def test_igds_recovers_the_planted_feature_and_random_features_rarely_clear_the_null(tiny_model_dir, tmp_path):
    """Would catch: a null that lets random directions through at the first-order sign's rate (here most
    random SAE features raise the metric on the confirming half), a null pushed at other norms or other
    positions than the features, alpha's sweep maximum taken as the delta, or the planted feature lost."""
    prompts = [
        f"### User:\nWhat is {a} plus {b}?\n### Assistant:\n"
        for a, b in [(2, 3), (4, 1), (6, 2), (1, 1), (3, 3), (2, 2)]
    ]
    answers = ["The sum is 5.", "The sum is 5.", "The sum is 8.", "The sum is 2.", "The sum is 6.", "The sum is 4."]
    raw = {
        "input": {"paths": ["x"]},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "encode": {"device": "cpu"},
    }
    igds = IGDSConfig(targets=["t"], alphas=[0.5, 1.0, 2.0], null_norms=3)
    sae_dir = planted_sae(tmp_path / "sae", RunConfig.model_validate(raw).stack(), igds, prompts, answers, planted=37)
    stack = RunConfig.model_validate(raw | {"sae": {"path": str(sae_dir)}}).stack()
    effects = Interventions(stack, igds, prompts, answers, {j: 0.5 for j in range(128)}, layer=1)
    assert (len(effects.choose), len(effects.confirm)) == (3, 3)
    table = effects(pa.table({"feature": list(range(0, 128, 3)) + [37]}))
    norms = null_grid(table["norm"].to_numpy(), igds.null_norms)
    rows = [{"norm": n, "direction": r} for n in norms for r in range(igds.null_directions)]
    null = effects(pa.Table.from_pylist(rows))  # the same actor measures the null
    judged, summary = against_null(table, null, igds.null_quantile)
    best, *others = judged.to_pylist()
    assert best["feature"] == 37 and best["cleared_null"] and best["delta"] > best["null_threshold"] > 0
    assert len(others) == 43 and sum(r["delta"] > 0 for r in others) >= 15  # the sign alone lets many through
    assert sum(r["cleared_null"] for r in others) <= 4
    assert len(summary["norms"]) == 3 and summary["directions"] == 20
    assert all(r["base"] == effects.base for r in table.to_pylist())
    assert not decoder_layers(effects.metric.model)[1]._forward_hooks
    assert effects.metric(pairs=effects.confirm) == effects.base  # no intervention left behind


def test_a_candidates_null_threshold_is_the_quantile_at_its_own_norm_interpolated_in_log_norm():
    """Would catch a threshold read at another norm (the largest, or interpolated in linear norm: 0.167 at
    norm 2), another quantile, or a delta below 0 counted as helpful because it clears a negative null."""
    null = pa.table({"norm": [1.0] * 5 + [4.0] * 5, "delta": [0.0, 0.05, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3]})
    effects = pa.table({"feature": [1, 2, 3], "delta": [0.15, 0.15, -0.01], "norm": [1.0, 2.0, 0.5]})
    judged, summary = against_null(effects, null, 0.5)
    by = {r["feature"]: r for r in judged.to_pylist()}
    assert summary["thresholds"] == [0.1, 0.3] and summary["norms"] == [1.0, 4.0]
    assert by[2]["null_threshold"] == pytest.approx(0.2) and not by[2]["cleared_null"]
    assert by[1]["cleared_null"] and by[1]["null_threshold"] == pytest.approx(0.1)
    assert not by[3]["cleared_null"]  # below the smallest norm the smallest norm's threshold, and delta < 0
    negative = pa.table({"norm": [1.0] * 2, "delta": [-0.3, -0.2]})
    assert not against_null(effects, negative, 0.5)[0]["cleared_null"].to_pylist()[-1]
    assert null_grid(np.array([0.0, 1.0, 8.0]), 4) == pytest.approx([1.0, 2.0, 4.0, 8.0])


def test_a_feature_is_pushed_by_its_mean_over_the_dev_tokens_that_activate_it(tiny_model_dir, tmp_path):
    """Catches a_j read from anything else: the pool's mean max-pool, every token's mean (zeros
    included), padding or BOS counted, or the wrong layer. The reference runs each pair alone
    through the model and the SAE."""
    from sae_lens import SAE

    prompts = [
        f"### User:\nWhat is {a} plus {b}?{' Think.' * a}\n### Assistant:\n" for a, b in [(2, 3), (4, 1), (1, 1)]
    ]
    answers = ["The sum is 5.", "5", "It is 2, since one and one make two."]
    raw = {"input": {"paths": ["x"]}, "model": {"name": str(tiny_model_dir), "dtype": "float32"},
           "encode": {"device": "cpu"}, "sae": {"path": str(build_tiny_sae(tmp_path / "sae"))}}  # fmt: skip
    stack = RunConfig.model_validate(raw).stack()
    igds = IGDSConfig(targets=["t"], alphas=[1.0], batch_size=2)  # two rows of different lengths: padded
    effects = Interventions(stack, igds, prompts, answers, {j: 100.0 + j for j in range(128)}, layer=1)

    sae, model = SAE.load_from_disk(tmp_path / "sae"), effects.metric.model
    z = []
    for pair in effects.metric.pairs:
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([pair.prompt_ids + pair.answer_ids]), output_hidden_states=True)
            z.append(sae.encode(hidden.hidden_states[2][0, effects.metric.first :]))
    z = torch.cat(z).numpy()
    fired = (z > 0).any(0)
    assert 0 < fired.sum() < 128  # both cases occur
    rows = effects(pa.table({"feature": list(range(128))})).to_pylist()
    assert len(rows) == 128
    for j, r in enumerate(rows):
        if fired[j]:
            assert r["typical_from"] == "dev tokens"
            assert r["typical"] == pytest.approx(z[:, j][z[:, j] > 0].mean(), rel=1e-4)
        else:  # no dev token activates it: the pool's figure, said so
            assert (r["typical"], r["typical_from"]) == (100.0 + j, "pool max-pool")


def test_igds_writes_its_delta_table_and_selects_by_the_task_features(task_run):
    root, manifest, _ = task_run
    m = json.loads((root / "selection" / "igds" / "manifest.json").read_text())
    effects = m["feature_effects"]
    assert len(effects) == 6 and {"feature", "delta", "base", "amplified", "lift", "null_threshold"} <= set(effects[0])
    deltas = [e["delta"] for e in effects]
    assert deltas == sorted(deltas, reverse=True)
    # alpha is the sweep's best on the first half; delta is measured again at it on the second
    for e in effects:
        assert len(e["delta_by_alpha"]) == len(IGDSConfig(targets=["t"]).alphas)
        assert e["alpha"] == IGDSConfig(targets=["t"]).alphas[e["delta_by_alpha"].index(max(e["delta_by_alpha"]))]
        assert e["cleared_null"] == (e["delta"] > max(e["null_threshold"], 0))
    cleared = [e["feature"] for e in effects if e["cleared_null"]]
    recall = sorted(effects, key=lambda e: (-e["lift"], e["feature"]))
    # a random SAE on a random model: what cleared the null, else frequency recall's top 2 (this entry's
    # fallback); would catch features taken from the sign of delta, or the fallback's record wrong
    assert m["cleared_null"] == len(cleared) and m["positive_features"] == sum(d > 0 for d in deltas)
    assert m["null"]["directions"] == 20 and len(m["null"]["thresholds"]) == 4
    expected = cleared[:2] if cleared else [e["feature"] for e in recall[:2]]
    assert m["task_features"] == expected
    assert m["task_feature_source"] == ("interventions" if cleared else "recall (no feature raised the metric)")
    assert m["counts"]["n_selected"] == 15 and m["budget"] == 15
    pool = FeatureStore(Storage(str(root), RunConfig.model_validate(manifest["config"]).s3)).table()
    sums = {
        i: sum(s for j, s in zip(f, v) if j in m["task_features"])
        for i, f, v in zip(pool["id"].to_pylist(), pool["feat_ids"].to_pylist(), pool["feat_sum"].to_pylist())
    }
    selected = pq.read_table(root / "selection" / "igds" / "selected.parquet").to_pylist()
    tie = dict(zip(sums, seeded_hash(list(sums), 0).tolist()))  # select.seed 0
    assert [r["id"] for r in selected] == sorted(sums, key=lambda i: (-sums[i], tie[i]))[:15]


def test_without_a_helpful_feature_igds_stops_or_falls_back_as_configured():
    from raysel.methods.igds import task_features_of

    default = IGDSConfig(targets=["t"], keep=2)
    assert task_features_of(default, [7, 3, 9], [1, 2, 3], 6) == ([7, 3], "interventions")
    with pytest.raises(ValueError, match=r"select.methods\[igds\].fallback: recall"):
        task_features_of(default, [], [1, 2, 3], 6)
    features, source = task_features_of(default.model_copy(update={"fallback": "recall"}), [], [1, 2, 3], 6)
    assert features == [1, 2] and source.startswith("recall")


def metric_stack(model_dir, max_tokens=512):
    raw = {"input": {"paths": ["x"]}, "model": {"name": str(model_dir), "dtype": "float32"},
           "prepare": {"max_tokens": max_tokens}, "encode": {"device": "cpu"}}  # fmt: skip
    return RunConfig.model_validate(raw).stack()


def test_a_target_longer_than_max_tokens_is_skipped_and_counted_not_scored_on_its_prompt(tiny_model_dir):
    prompts = [
        "### User:\nWhat is 2 plus 3?\n### Assistant:\n",
        "### User:\n" + "many words " * 30 + "\n### Assistant:\n",
    ]
    answers = ["5", "The sum is 5."]
    metric = TaskMetric(metric_stack(tiny_model_dir, max_tokens=40), IGDSConfig(targets=["t"]), prompts, answers)
    assert metric.skipped == 1 and [p.answer for p in metric.pairs] == ["5"]
    with pytest.raises(ValueError, match="prepare.max_tokens"):
        TaskMetric(metric_stack(tiny_model_dir, max_tokens=8), IGDSConfig(targets=["t"]), prompts, answers)


def test_exact_match_generates_in_batches_and_amplifies_the_positions_loglik_does(tiny_model_dir):
    """Left padding for batched generation must not move a row's amplified positions or its output."""
    prompts = [
        f"### User:\nWhat is {a} plus {b}?{' Think.' * a}\n### Assistant:\n" for a, b in [(2, 3), (4, 1), (1, 1)]
    ]
    answers = ["5", "5", "2"]
    cfg = IGDSConfig(targets=["t"], metric="exact_match", max_new_tokens=6, batch_size=3)
    metric = TaskMetric(metric_stack(tiny_model_dir), cfg, prompts, answers)
    seqs = [p.prompt_ids for p in metric.pairs]
    assert len({len(s) for s in seqs}) == 3  # the batch really pads
    _, right_mask, right = metric._padded(seqs, left=False)
    _, left_mask, left = metric._padded(seqs, left=True)
    for r, s in enumerate(seqs):  # the same positions of each sequence, wherever its padding is
        assert right[r][right_mask[r].bool()].tolist() == left[r][left_mask[r].bool()].tolist()
        assert right[r][right_mask[r].bool()].tolist() == [i >= metric.first for i in range(len(s))]
    assert 1 < metric.first < min(map(len, seqs))  # BOS and the template's shared prefix are left out
    vector = torch.randn(64)
    one_by_one = [metric._exact([pair], 1, vector) for pair in metric.pairs]
    assert metric._exact(metric.pairs, 1, vector) == [r for [r] in one_by_one]
    tok = metric.tokenizer

    def said(batch):
        ids, attention, counted = metric._padded([p.prompt_ids for p in batch], left=True)
        with torch.inference_mode(), amplified(metric.model, 1, vector, counted):
            out = metric.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=6, do_sample=False,
                                        pad_token_id=tok.pad_token_id)  # fmt: skip
        return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    assert said(metric.pairs) == [t for pair in metric.pairs for t in said([pair])]
