"""The driver's progress line off a terminal (pytest's stderr is not one): counts, rate and ETA."""

import logging

from raysel.core.progress import Progress


def test_off_a_terminal_progress_is_a_log_line_with_counts_and_an_eta(caplog):
    with caplog.at_level(logging.INFO, logger="raysel"):
        p = Progress("encode", units=3, items=30, every=0)
        p.update(10)
        p.update(12)
        p.close()
    assert p.bar is None
    assert caplog.messages[0].startswith("encode: shards 1/3, samples 10/30, ")
    assert caplog.messages[1].startswith("encode: shards 2/3, samples 22/30, ") and "ETA" in caplog.messages[1]
    assert caplog.messages[2].startswith("encode: shards 2/3, samples 22/30, ") and "(done in" in caplog.messages[2]


def test_progress_within_a_unit_logs_items_alone(caplog):
    """An encode actor's line within its shard: no "shard 0/1" that never moves."""
    with caplog.at_level(logging.INFO, logger="raysel"):
        p = Progress("encode part-0.parquet", units=0, items=100, every=0, bar=False)
        p.add(40)
    assert caplog.messages[0].startswith("encode part-0.parquet: samples 40/100, ") and "ETA" in caplog.messages[0]
