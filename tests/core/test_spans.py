"""Top-activating spans: the window, and the spans re-encoded on a real Ray cluster with the tiny
model and SAE against the statistics."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel.core.spans import WINDOW, find_spans, window
from raysel.core.storage import Storage


def test_a_window_keeps_32_tokens_around_the_peak_and_shifts_at_the_edges():
    assert window(40, 100) == (25, 57) and window(2, 100) == (0, WINDOW) and window(95, 100) == (68, 100)
    assert window(3, 10) == (0, 10)


def test_spans_re_encode_the_top_samples_and_find_their_peak(stats_run):
    root, cfg, manifest = stats_run
    storage = Storage(str(root), cfg.s3)
    stats = {r["feature"]: r for r in pq.read_table(root / "stats" / "features.parquet").to_pylist()}
    prepared = {r["id"]: r["text"] for r in pq.read_table(root / "prepared", columns=["id", "text"]).to_pylist()}
    wanted = [j for j in sorted(stats) if stats[j]["top_ids"]][:3]
    spans = find_spans(cfg.stack(), storage, wanted).to_pylist()
    for j in wanted:
        mine = [r for r in spans if r["feature"] == j]
        assert [r["id"] for r in mine] == stats[j]["top_ids"] and [r["rank"] for r in mine] == list(
            range(1, len(mine) + 1)
        )
        np.testing.assert_allclose([r["value"] for r in mine], stats[j]["top_values"], rtol=1e-4)
        for r in mine:
            assert 0 < len(r["tokens"]) == len(r["acts"]) <= WINDOW
            assert r["acts"][r["peak"]] == pytest.approx(r["value"]) and max(r["acts"]) == pytest.approx(r["value"])
            assert "".join(r["tokens"]) in prepared[r["id"]]

    assert {r["feature"] for r in spans} == set(wanted)
    assert find_spans(cfg.stack(), storage, [max(stats) + 1]).num_rows == 0  # a feature with no top samples
