"""`raysel status` reads where a run stands from its root alone: a finished run, and one caught
mid-encode (markers removed and their times set, so the rate and the ETA are known exactly)."""

import json
import os
import shutil

import pytest

from raysel import cli
from raysel.config import S3Config
from raysel.core.storage import Storage
from raysel.status import run_status

T0 = 1_800_000_000.0


def test_a_finished_run_shows_each_stage_done(stats_run, capsys):
    root, _, manifest = stats_run
    assert cli.main(["status", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    status = json.loads(out[-1])
    assert status["stages"]["prepare"]["state"] == "done" and status["stages"]["prepare"]["n_valid"] == 40
    assert status["stages"]["encode"] == {**status["stages"]["encode"], "state": "done", "n_encoded": 40}
    assert status["stages"]["select"] == {"state": "pending"}
    assert any(line.startswith("  encode     done") and "n_encoded 40" in line for line in out)


def test_a_run_caught_mid_encode_shows_shards_rate_and_eta(stats_run, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(stats_run[0], root)
    for name in ("encode", "stats", "spans"):
        (root / "stages" / f"{name}.json").unlink(missing_ok=True)
    (root / "manifest.json").unlink()
    os.utime(root / "stages" / "prepare.json", (T0, T0))
    done = sorted((root / "features" / "_done").glob("*.json"))
    done[-1].unlink()  # the last shard is still being encoded
    for i, marker in enumerate(done[:-1], start=1):
        os.utime(marker, (T0 + 10 * i, T0 + 10 * i))
    stale = json.loads(done[0].read_text()) | {"key": {"fingerprint": "an-earlier-config"}, "rows": 999}
    (root / "features" / "_done" / "old.parquet.json").write_text(json.dumps(stale))
    os.utime(root / "features" / "_done" / "old.parquet.json", (T0 + 1, T0 + 1))

    rows = sum(json.loads(m.read_text())["rows"] for m in done[:-1])
    last = T0 + 10 * (len(done) - 1)
    status = run_status(Storage(str(root), S3Config()), now=last + 2)
    encode = status["stages"]["encode"]
    assert (encode["state"], encode["shards_done"], encode["shards"]) == ("in progress", len(done) - 1, len(done))
    assert (encode["samples_done"], encode["samples"]) == (rows, 40)
    rate = rows / (last - T0)
    assert encode["samples_per_s"] == pytest.approx(rate, abs=0.01)
    assert encode["eta_s"] == round((40 - rows) / rate - 2)
    assert status["stages"]["stats"] == {"state": "pending"} and not status["finished"]

    assert cli.main(["status", str(root)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  encode"))
    assert f"shards {len(done) - 1}/{len(done)}, samples {rows}/40" in line and "ETA" in line


def test_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path)]) == 3
    assert "holds no run" in capsys.readouterr().err
