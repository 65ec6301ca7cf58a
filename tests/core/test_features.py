"""The pool's CSR, read from the activated sets the statistics wrote in any block order, and its
features' document frequency."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.core.features import ACTIVATED_SCHEMA, csr_by_id, document_frequency, list_entries, top_k


def shuffled_blocks(seed: int) -> tuple[list[pa.Table], dict[str, list[int]]]:
    """Sets of 0 to 9 features (empty ones too) under ids in random order, cut into blocks of random
    sizes, one of them empty."""
    rng = np.random.default_rng(seed)
    sets = {f"s{i:04d}": sorted(rng.choice(50, rng.integers(0, 10), replace=False).tolist()) for i in range(500)}
    ids = rng.permutation(sorted(sets))
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), 8, replace=False))
    blocks = [
        pa.Table.from_pydict({"id": part.tolist(), "feats": [sets[i] for i in part]}, schema=ACTIVATED_SCHEMA)
        for part in np.split(ids, cuts)
    ]
    return [*blocks[:3], ACTIVATED_SCHEMA.empty_table(), *blocks[3:]], sets


@pytest.mark.parametrize("seed", [0, 1])
def test_csr_by_id_places_every_set_at_its_ids_rank(seed):
    """Catches an entry copied to the wrong place (a set's offset in its block against its place in the
    sorted CSR), an empty set or block shifting the ones after it, or ids left in read order."""
    blocks, sets = shuffled_blocks(seed)
    ids, indptr, indices = csr_by_id(lambda: blocks)
    assert ids.tolist() == sorted(sets)
    assert indices.dtype == np.int32 and indptr[-1] == indices.size
    assert [indices[indptr[r] : indptr[r + 1]].tolist() for r in range(len(ids))] == [sets[i] for i in sorted(sets)]


def test_csr_by_id_of_no_blocks_has_the_types_of_some():
    """Catches an empty pool whose values come back as int32: kcenter would take its pooled
    activations as integers, and numba compile it a second kernel for them."""
    ids, indptr, feats, values = csr_by_id(lambda: [], ("feats", "values"))
    assert len(ids) == 0 and indptr.tolist() == [0]
    assert feats.dtype == np.int32 and values.dtype == np.float64


def test_csr_by_id_refuses_sets_that_changed_between_its_two_reads():
    blocks, _ = shuffled_blocks(0)
    reads = iter([blocks, blocks[:-1]])
    with pytest.raises(RuntimeError, match="changed between their two reads"):
        csr_by_id(lambda: next(reads))


def test_document_frequency_counts_as_bincount_without_its_int64_copy():
    # catches a count that drops the largest feature or miscounts int32 entries: the pool's
    # n_features and the idf weights both read it
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 300, 5000).astype(np.int32)
    assert np.array_equal(document_frequency(indices), np.bincount(indices))
    assert document_frequency(np.zeros(0, np.int32)).tolist() == [0]


def test_list_entries_counts_the_elements_not_the_empty_or_null_lists(tmp_path):
    """Parquet's num_values counts a level for each empty list: a store of many samples that fire no
    feature would otherwise claim entries it lacks, and tau's calibration rank would lie beyond them."""
    lists = [[1, 2], [], [3], None, [], [4, 5, 6]] * 50
    pq.write_table(
        pa.table({"feat_ids": pa.array(lists, pa.list_(pa.int32()))}), tmp_path / "s.parquet", row_group_size=70
    )
    meta = pq.ParquetFile(tmp_path / "s.parquet").metadata
    assert meta.num_row_groups > 1
    assert list_entries(meta, "feat_ids") == 6 * 50


def test_a_cut_through_tied_scores_is_not_the_id_order_and_follows_the_seed():
    """Would catch ties broken by id: the shared pool's ids sort by source, so zero-score ties filled
    with one source first (here: every pick an "a_" id)."""
    ids = np.array([f"a_{i:03d}" for i in range(100)] + [f"b_{i:03d}" for i in range(100)], dtype=object)
    picked = {seed: top_k(ids, np.zeros(200), 20, seed)["id"].to_pylist() for seed in (0, 1)}
    assert picked[0] == top_k(ids, np.zeros(200), 20, 0)["id"].to_pylist()  # the same seed, the same cut
    assert picked[0] != picked[1] and all(5 <= sum(i.startswith("a_") for i in p) <= 15 for p in picked.values())
