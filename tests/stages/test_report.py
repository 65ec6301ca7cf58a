"""The run report: the numbers that feed it, and the page itself rendered in headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium)."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel import cli
from raysel.config import RunConfig
from raysel.core.storage import Storage
from raysel.pipeline import run
from raysel.stages.report import report_data, write_report
from raysel.stages.spans import SHOWN
from tests.conftest import run_cfg


@pytest.fixture(scope="module")
def two_runs(ray_cluster, tiny_model_dir, tiny_sae_dir, tmp_path_factory):
    """A run with three methods and bad rows, and one with a single method and no rejects."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "full").mkdir()
    (tmp / "single").mkdir()
    full = run_cfg(tmp / "full", tiny_model_dir, tiny_sae_dir, 50)
    with open(full["input"]["paths"][0], "a") as f:
        f.write('{"id": "bad-1", "instruction": 7}\nnot json\n')
    full["select"] = {"budget": 10, "methods": ["coverage", "random", "longest"]}
    single = run_cfg(tmp / "single", tiny_model_dir, tiny_sae_dir, 30)
    single["select"] = {"budget": 8, "methods": ["coverage"]}
    roots = {}
    for name, raw in (("full", full), ("single", single)):
        run(RunConfig.model_validate(raw), until=["select", "report"])  # as `raysel run` targets them
        roots[name] = Storage(raw["output"]["root"], RunConfig.model_validate(raw).s3)
    return roots


def test_the_report_data_matches_the_run(two_runs):
    storage = two_runs["full"]
    root = storage.root
    manifest = json.loads(open(os.path.join(root, "manifest.json")).read())
    data = report_data(storage, manifest, page=7)
    assert data["counts"] == manifest["counts"] and data["counts"]["n_rejected"] == 2
    assert set(data["curves"]) == {"coverage", "random", "longest"} and data["primary"] == "coverage"
    assert data["coverage_at_budget"]["coverage"] == data["curves"]["coverage"][-1]["coverage"]
    # histograms, not per-sample arrays: every prepared sample in the pool's, the 10 picks in the selection's
    assert sum(data["token_lengths"]["pool"]) == 50 and sum(data["token_lengths"]["selected"]) == 10
    stats = pq.read_table(os.path.join(root, "stats", "features.parquet"))["doc_freq"].to_numpy()
    assert sum(data["doc_freq"]["counts"]) == (stats > 0).sum() > 0
    assert {t["stage"] for t in data["timings"]} >= {"prepare", "encode", "stats", "select"}

    # covered and missed features, recomputed from the store at tau 0
    ids = pq.read_table(os.path.join(root, "selection", "coverage", "selected.parquet"))["id"].to_pylist()
    store = pq.read_table(os.path.join(root, "features")).to_pylist()
    hits = np.zeros(len(stats), int)
    for r in store:
        if r["id"] in ids:
            hits[r["feat_ids"]] += 1
    covered = [f for f in data["features"] if f["status"] == "covered"]
    missed = [f for f in data["features"] if f["status"] == "missed"]
    assert [f["selected"] for f in covered] == sorted(hits[hits > 0], reverse=True)[:SHOWN]
    # the pool's most frequent features the selection never fires, ties by id: a report that showed
    # too few, covered ones, or the rarest, fails here (a loop over them alone would pass on none)
    unseen = [int(j) for j in np.lexsort((np.arange(len(stats)), -stats)) if stats[j] > 0 and hits[j] == 0]
    assert [f["feature"] for f in missed] == unseen[:SHOWN]
    for f in data["features"]:
        assert 0 < len(f["spans"]) <= 3 and all(s["acts"][s["peak"]] == max(s["acts"]) for s in f["spans"])
    assert [s["id"] for s in data["samples"]] == ids[:7]

    # the methods side by side: each one's coverage as its manifest has it, and the picks it shares
    picks = {m: set(pq.read_table(os.path.join(root, "selection", m, "selected.parquet"))["id"].to_pylist())
             for m in ("coverage", "random", "longest")}  # fmt: skip
    for m, row in data["methods"].items():
        selection = json.loads(open(os.path.join(root, "selection", m, "manifest.json")).read())
        assert row["coverage"] == selection["coverage_at_budget"][m] and row["selected"] == 10
        for other, share in row["shared_with"].items():
            assert share == round(len(picks[m] & picks[other]) / 10, 3)
    assert len(data["methods"]) == 3


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed in CI (make test installs them)")
        pytest.skip("no chromium here: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1200", f"--user-data-dir={tmp}"):
        options.add_argument(arg)
    # chromium puts its singleton socket in a folder of its own under TMPDIR, and leaves it: not in /tmp
    session = webdriver.Chrome(service=Service(driver, env={**os.environ, "TMPDIR": str(tmp)}), options=options)
    yield session
    session.quit()


@pytest.mark.parametrize("which", ["full", "single"])
def test_the_page_renders_its_plots_and_feature_table_in_chromium(two_runs, browser, which, tmp_path):
    storage = two_runs[which]
    page = write_report(storage, json.loads(open(os.path.join(storage.root, "manifest.json")).read()))
    assert json.loads(open(os.path.join(storage.root, "report.json")).read())["counts"]["n_input"] >= 30
    browser.get("file://" + os.path.abspath(page))
    browser.save_screenshot(str(tmp_path / f"report-{which}.png"))
    assert (tmp_path / f"report-{which}.png").stat().st_size > 10_000
    images = browser.find_elements("css selector", "img.plot")
    # coverage curves, document frequency, token lengths; no task scores or IGDS deltas in these runs
    assert [i.get_attribute("alt") for i in images] == [
        "Feature coverage against budget", "Feature document frequency", "Token lengths"
    ]  # fmt: skip
    for img in images:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 640
        assert img.size == {"width": 640, "height": 360}
    methods = browser.find_elements("css selector", "#methods tbody tr")
    assert len(methods) == (3 if which == "full" else 1)
    browser.find_elements("css selector", "#methods th")[3].click()  # sort by coverage, ascending
    coverage = [
        float(r.find_elements("tag name", "td")[3].text)
        for r in browser.find_elements("css selector", "#methods tbody tr")
    ]
    assert coverage == sorted(coverage)
    rows = browser.find_elements("css selector", "#features tbody tr")
    assert len(rows) >= 2 and browser.find_elements("css selector", "#features mark")
    first_feature = rows[0].find_elements("tag name", "td")[0].text
    search = browser.find_element("id", "search")
    search.send_keys("zzz-no-such-text")
    assert all(not r.is_displayed() for r in browser.find_elements("css selector", "#features tbody tr"))
    search.clear()
    search.send_keys(" ")  # an input event with a blank query shows every row again
    browser.execute_script("arguments[0].value=''; arguments[0].dispatchEvent(new Event('input'))", search)
    assert all(r.is_displayed() for r in browser.find_elements("css selector", "#features tbody tr"))
    header = browser.find_elements("css selector", "#features th")[0]
    header.click()
    ascending = [
        int(r.find_elements("tag name", "td")[0].text)
        for r in browser.find_elements("css selector", "#features tbody tr")
    ]
    assert ascending == sorted(ascending) and str(ascending[0]) != "" and first_feature
    rejected = browser.find_element("id", "summary").text
    assert ("Rejected by reason: none" in rejected) == (which == "single")


def test_raysel_report_cli_writes_the_page(two_runs, capsys):
    root = two_runs["single"].root
    os.remove(os.path.join(root, "report.html")) if os.path.exists(os.path.join(root, "report.html")) else None
    assert cli.main(["report", root]) == 0
    assert os.path.exists(os.path.join(root, "report.html")) and "report.html" in capsys.readouterr().out
    assert cli.main(["report", os.path.join(root, "nowhere")]) == 3
