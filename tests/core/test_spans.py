"""Top-activating spans come from the encode pass: the window, the shard's candidates, and the
spans of a run on a real Ray cluster with the tiny model and SAE against a fresh encode of each
top sample on its own."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from raysel.core.encoder import Encoder
from raysel.core.spans import TOP, WINDOW, TopSpans, find_spans, window
from raysel.core.storage import Storage


def test_a_window_keeps_32_tokens_around_the_peak_and_shifts_at_the_edges():
    lo, hi = window(torch.tensor([40, 2, 95, 3]), torch.tensor([100, 100, 100, 10]))
    assert lo.tolist() == [25, 0, 68, 0] and hi.tolist() == [57, WINDOW, 100, 10]


def test_the_candidates_keep_each_features_top_samples_once_across_batches():
    """Would catch: a retried batch's samples kept twice, or a later batch's stronger sample lost."""
    spans = TopSpans()

    def batch(ids, values):
        n = len(values)
        return np.array(ids, object), {
            "feature": np.zeros(n, np.int32), "sample": np.arange(n), "value": np.array(values, np.float32),
            "start": np.zeros(n, np.int32), "length": np.ones(n, np.int32), "peak": np.zeros(n, np.int32),
            "acts": np.tile(np.eye(1, WINDOW, dtype=np.float32), (n, 1)) * np.array(values, np.float32)[:, None],
        }  # fmt: skip

    spans.add(*batch([f"a{i:02d}" for i in range(TOP)], [1.0] * TOP))
    spans.add(*batch(["b", "a03"], [5.0, 1.0]))  # a03 again, as a retried batch gives it
    table = spans.table().to_pylist()
    assert [r["id"] for r in table] == ["b"] + [f"a{i:02d}" for i in range(TOP - 1)]
    assert table[0]["act"] == [5.0] and table[0]["act_at"] == [0]


def fresh_spans(cfg, texts: dict[str, str], feature: int) -> list[dict]:
    """The feature's window in each sample, each sample run on its own through the full model (its
    hidden states) and the dense SAE: what the re-encoding spans stage used to compute."""
    encoder = Encoder(cfg.stack())  # its tokenizer, SAE and the template prefix it skips
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name).eval()
    k, out = len(encoder.prefix_ids), []
    for sample, text in texts.items():
        ids = encoder.tokenizer(text)["input_ids"][: cfg.prepare.max_tokens]
        first = k if k and ids[:k] == encoder.prefix_ids else 1
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[encoder.layer + 1][0, first:]
            z = encoder.sae.encode(h)
        col = (z.to_dense() if z.is_sparse else z)[:, feature]
        peak = int(col.argmax())
        lo, hi = (int(x) for x in window(torch.tensor(peak), torch.tensor(len(col))))
        tokens = encoder.tokenizer.batch_decode([[t] for t in ids[first + lo : first + hi]])
        out.append(
            {"id": sample, "value": float(col[peak]), "tokens": tokens, "acts": col[lo:hi].tolist(), "peak": peak - lo}
        )
    return sorted(out, key=lambda r: (-r["value"], r["id"]))


def test_the_spans_from_the_encode_pass_equal_a_fresh_encodes(stats_run):
    """Would catch: a window placed off the peak, the prefix or the attention sink counted in the
    offsets, activations scattered to the wrong token or feature, or top samples that are not the
    statistics' (each re-encoded alone here, as the spans stage used to)."""
    root, cfg, manifest = stats_run
    storage = Storage(str(root), cfg.s3)
    stats = {r["feature"]: r for r in pq.read_table(root / "stats" / "features.parquet").to_pylist()}
    prepared = {r["id"]: r["text"] for r in pq.read_table(root / "prepared", columns=["id", "text"]).to_pylist()}
    wanted = [j for j in sorted(stats) if stats[j]["top_ids"]][:: max(1, len(stats) // 4)][:4]
    spans = find_spans(cfg.stack(), storage, wanted).to_pylist()
    assert len(wanted) == 4 and {r["feature"] for r in spans} == set(wanted)
    for j in wanted:
        mine = [r for r in spans if r["feature"] == j]
        assert [r["id"] for r in mine] == stats[j]["top_ids"] and [r["rank"] for r in mine] == list(
            range(1, len(mine) + 1)
        )
        fresh = fresh_spans(cfg, {i: prepared[i] for i in stats[j]["top_ids"]}, j)
        for got, want in zip(mine, fresh, strict=True):
            assert (got["id"], got["tokens"], got["peak"]) == (want["id"], want["tokens"], want["peak"])
            np.testing.assert_allclose(got["acts"], want["acts"], rtol=1e-4, atol=1e-5)
            assert got["value"] == pytest.approx(want["value"], rel=1e-4) and 0 < len(got["tokens"]) <= WINDOW
    assert find_spans(cfg.stack(), storage, [max(stats) + 1]).num_rows == 0  # a feature with no top samples
