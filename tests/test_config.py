import json
import logging

import pytest

from raysel.cli import build_parser, demo_config, main
from raysel.config import ConfigError, load_config
from raysel.core.paths import demo_data


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), list(overrides))
    return str(err.value)


def test_valid_config_resolves_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "input:\n  paths: data/*.jsonl\nprepare:\n  max_tokens: 128\n"),
        ["prepare.dedup=false", "input.fields.id=uid", "output.root=s3://b/p"],
    )
    assert cfg.input.paths == ["data/*.jsonl"]
    assert cfg.prepare.max_tokens == 128
    assert cfg.prepare.dedup is False
    assert cfg.input.fields.id == "uid"
    assert cfg.output.root == "s3://b/p"


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\nprepare:\n  max_tokenz: 5\n")
    assert "prepare.max_tokenz: unknown key" in msg
    assert "max_tokens" in msg and "dedup" in msg


def test_unknown_nested_key_and_unknown_section(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\n  fields:\n    instr: q\nencoder: {}\n")
    assert "input.fields.instr: unknown key" in msg and "instruction" in msg
    assert "encoder: unknown key" in msg and "prepare" in msg


def test_bad_type_names_the_key(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\nprepare:\n  max_tokens: lots\n")
    assert "prepare.max_tokens" in msg and "integer" in msg and "'lots'" in msg


def test_bad_value_names_the_key_and_the_allowed_values(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\n  format: xml\n")
    assert "input.format" in msg
    for allowed in ("auto", "jsonl", "json", "parquet", "hf_disk"):
        assert allowed in msg


def test_out_of_range_value_names_the_key(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\n", ["prepare.max_tokens=0"])
    assert "prepare.max_tokens" in msg and "greater than 0" in msg


def test_override_of_unknown_key_is_an_error(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\n", ["model.dtypo=bfloat16"])
    assert "model.dtypo: unknown key" in msg


def test_set_reaches_a_method_entry_by_name_or_index_and_the_default_list():
    """Would catch --set writing a mapping key into a list (pydantic's error then names no key), the
    default methods lost when the config lists none, or a name matched against the wrong entry."""
    cfg = load_config(None, ['input.paths=["x"]', "select.methods.coverage.budget=5", "select.methods.2.budget=7"])
    assert [(e.name, e.budget) for e in cfg.select.methods] == [("coverage", 5), ("random", None), ("longest", 7)]
    raw = {"input": {"paths": ["a", "b"]}, "select": {"methods": ["random", {"name": "mona", "targets": ["t"]}]}}
    cfg = load_config(None, ["select.methods.mona.pooling=sum", "input.paths.1=c"], raw=raw)
    assert cfg.select.methods[1].pooling == "sum" and cfg.select.methods[1].targets == ["t"]
    assert cfg.input.paths == ["a", "c"] and raw["input"]["paths"] == ["a", "b"]  # the caller's dict untouched
    with pytest.raises(ConfigError, match=r"select.methods has no entry 'igds' \(coverage, random, longest\)"):
        load_config(None, ['input.paths=["x"]', "select.methods.igds.keep=2"])
    with pytest.raises(ConfigError, match="input.paths has 1 entries; 3 is out of range"):
        load_config(None, ['input.paths=["x"]', "input.paths.3=y"])


def test_override_without_equals_sign(tmp_path):
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\n", ["prepare.max_tokens"])
    assert "section.key=value" in msg


def test_input_needs_exactly_one_source(tmp_path):
    assert "exactly one of input.paths or input.hf_dataset" in error_of(tmp_path, "prepare: {}\n")


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    assert "not valid YAML" in error_of(tmp_path, "input: [unclosed\n")


def test_secrets_stay_out_of_manifests_and_errors(tmp_path):
    cfg = load_config(
        write(tmp_path, "input:\n  paths: [a.jsonl]\ns3:\n  access_key: AKIA123\n  secret_key: hunter2\n")
    )
    dumped = json.dumps(cfg.public_dict())
    assert "hunter2" not in dumped and "AKIA123" not in dumped
    assert cfg.s3.secret_key.get_secret_value() == "hunter2"
    msg = error_of(tmp_path, "input:\n  paths: [a.jsonl]\ns3:\n  secret_key: [hunter2]\n")
    assert "s3.secret_key" in msg and "hunter2" not in msg


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    path = write(tmp_path, "input:\n  paths: [a.jsonl]\nprepare:\n  chat_template: fancy\n")
    assert main(["run", str(path)]) == 3
    err = capsys.readouterr().err
    assert "prepare.chat_template" in err and "'auto' or 'fallback'" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 3
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["run", "encode", "select", "demo", "train-sae", "report"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert "--set" in capsys.readouterr().out


def test_verb_without_its_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == 2
    assert "CONFIG" in capsys.readouterr().err


def test_loudness_flags_work_before_and_after_the_verb():
    """As people type it: `raysel run c.yaml -q` was a usage error; only `raysel -q run c.yaml` worked."""
    parse = build_parser().parse_args
    assert parse(["run", "c.yaml", "-q"]).quiet and parse(["-q", "run", "c.yaml"]).quiet
    assert parse(["status", "runs/r1", "--verbose"]).verbose and not parse(["run", "c.yaml"]).verbose
    with pytest.raises(SystemExit):
        parse(["run", "c.yaml", "-q", "-v"])


def test_demo_runs_the_bundled_data_into_out_or_the_documented_default(tmp_path):
    assert demo_config(None, []).output.root == "runs/demo"
    cfg = demo_config(str(tmp_path / "here"), ["select.budget=20"])
    assert cfg.output.root == str(tmp_path / "here") and cfg.select.budget == 20
    assert cfg.input.paths == [demo_data()] and cfg.model.name == "embedded:smollm2-135m-instruct"
    assert build_parser().parse_args(["demo", "--out", "d"]).out == "d"


@pytest.mark.parametrize(
    "override, names",
    [
        ("task.targets=[t.jsonl]", "select.methods: [{name: mona, targets: [...]}]"),
        ("igds.candidates=5", "select.methods: [{name: igds"),
        ("mona.pooling=sum", "select.methods: [{name: mona"),
        ("select.idf=true", "select.methods: [{name: coverage, idf: true}]"),
        ("select.distributed=on", "{name: coverage, distributed: on}"),
        ("fac.evaluated=[have.jsonl]", "{name: fac, evaluated: [...]}"),
    ],
)
def test_a_setting_that_moved_into_a_method_entry_names_its_new_place(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, ['input.paths=["x"]', override])
    assert override.split("=")[0].rsplit(".", 1)[0] in str(err.value) and names in str(err.value)


def test_python_dash_m_raysel_is_the_cli_with_a_version():
    import subprocess
    import sys

    import raysel

    out = subprocess.run([sys.executable, "-m", "raysel", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"raysel {raysel.__version__}"


@pytest.mark.parametrize("flag, level", [("-q", logging.WARNING), ("-v", logging.DEBUG), (None, logging.INFO)])
def test_quiet_and_verbose_set_raysels_log_level(tmp_path, flag, level):
    config = tmp_path / "bad.yaml"
    config.write_text("input: {paths: [x]}\nprepare: {max_tokenz: 5}\n")  # stops at the config, before any work
    assert main([*([flag] if flag else []), "run", str(config)]) == 3
    assert logging.getLogger("raysel").level == level


def test_the_api_takes_a_dict_or_a_runconfig_with_overrides_and_keeps_secrets():
    """raysel.run's config argument: a RunConfig dumped for its overrides once came back with its keys
    masked (`**********`), so every S3 request of the run failed."""
    from raysel.api import resolve

    cfg = resolve({"input": {"paths": ["x"]}, "s3": {"secret_key": "s3cret"}}, {"select__budget": 7})
    assert cfg.select.budget == 7 and cfg.s3.secret_key.get_secret_value() == "s3cret"
    again = resolve(cfg, {"prepare__max_tokens": 64, "input__paths": ["a.jsonl", "b.jsonl"]})
    assert (again.prepare.max_tokens, again.select.budget, again.input.paths) == (64, 7, ["a.jsonl", "b.jsonl"])
    assert again.s3.secret_key.get_secret_value() == "s3cret"
    with pytest.raises(ConfigError, match="prepare.max_tokenz: unknown key"):
        resolve(cfg, {"prepare__max_tokenz": 1})


def test_environment_overrides_sit_between_the_file_and_set(tmp_path, monkeypatch):
    """For a cluster job whose command line is fixed (a RayJob's entrypoint)."""
    config = tmp_path / "c.yaml"
    config.write_text("input: {paths: [x]}\nencode: {actors: 2}\n")
    monkeypatch.setenv("RAYSEL_ENCODE__ACTORS", "8")
    monkeypatch.setenv("RAYSEL_SELECT__BUDGET", "500")
    monkeypatch.setenv("RAYSEL_FREEZE_GOLDEN", "1")  # no `__`: not a config key, left alone
    cfg = load_config(str(config), ["select.budget=7"])
    assert (cfg.encode.actors, cfg.select.budget) == (8, 7)
    monkeypatch.setenv("RAYSEL_ENCODE__ACTORZ", "8")
    with pytest.raises(ConfigError, match="encode.actorz: unknown key"):
        load_config(str(config))


def test_raysel_config_prints_the_defaults_and_a_resolved_config_that_load_back(tmp_path, capsys):
    """What a user copies into a config file must load back to what was printed."""
    import yaml

    from raysel.config import RunConfig

    assert main(["config", "--defaults"]) == 0
    defaults = yaml.safe_load(capsys.readouterr().out)
    assert RunConfig.model_validate(defaults) == RunConfig.model_validate({"input": {"paths": ["data/*.jsonl"]}})
    assert set(defaults) == set(RunConfig.model_fields)
    config = tmp_path / "c.yaml"
    config.write_text("input: {paths: [x.jsonl]}\ns3: {secret_key: s3cret}\n")
    assert main(["config", str(config), "--set", "select.budget=9"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["select"]["budget"] == 9 and "s3cret" not in out
    assert main(["config"]) == 3 and "give one of CONFIG, --defaults or --reference" in capsys.readouterr().err
    assert main(["config", "--reference"]) == 0 and "| `select.budget` | `0.1` |" in capsys.readouterr().out
