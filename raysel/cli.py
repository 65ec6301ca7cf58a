"""`raysel VERB ...`: each verb takes a YAML config plus `--set section.key=value`
overrides, mirroring the fields of raysel.config.RunConfig."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources

from raysel import __version__
from raysel.config import ConfigError, load_config
from raysel.core import paths
from raysel.core.corpus import InputError
from raysel.core.storage import Storage, StorageError

# Exit codes: 0 done; 1 a bug (a traceback); 2 a usage error (argparse's own); 3 a config, input or
# storage error, or nothing to act on, before or during the run (finished work stays committed);
# 4 a dry run that found the run would fail at once.
EXIT_ERROR, EXIT_REFUSED = 3, 4


def demo_config_path() -> str:
    return str(resources.files("raysel") / "configs" / "demo.yaml")


def demo_config(out: str | None, overrides: list[str]):
    # the one CPU encode actor gets every core of the machine it runs on
    fixed = [
        f"input.paths={json.dumps([paths.demo_data()])}",
        f"evaluate.sets={json.dumps(paths.demo_eval_sets())}",
        f"encode.num_cpus={os.cpu_count() or 1}",
    ]
    return load_config(demo_config_path(), fixed + overrides + ([f"output.root={out}"] if out else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"raysel {__version__}")

    def loudness(p: argparse.ArgumentParser, default) -> None:
        """-v and -q before the verb or after it (there SUPPRESS: given only, they override)."""
        group = p.add_mutually_exclusive_group()
        group.add_argument("-v", "--verbose", action="store_true", default=default, help="raysel's debug logs too")
        group.add_argument("-q", "--quiet", action="store_true", default=default, help="raysel's warnings only")

    loudness(parser, False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def force_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--force",
            action="store_true",
            help="replace what output.root holds of other input files, or features encoded under another "
            "model, SAE, dtype or settings (never removed without it)",
        )

    def verb(name: str, help: str, config: bool = True) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        loudness(p, argparse.SUPPRESS)
        if config:
            p.add_argument("config", metavar="CONFIG", help="YAML config file")
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="print what the run would do (input files, stages and shards to run or skip, actor "
                "resources, model/SAE checks) and write nothing",
            )
            force_flag(p)
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config value, e.g. --set prepare.max_tokens=256 (repeatable)",
        )
        return p

    verb("run", "Run the whole job: prepare, encode, feature statistics, selection.")
    verb("encode", "Prepare and encode samples into the SAE feature store.")
    verb("select", "Select subsets from the feature store (select.methods), encoding first what is missing.")
    verb("train-sae", "Prepare the corpus and train a TopK SAE on it with sae-lens (the default SAE).")
    verb(
        "fac",
        "Measure FAC of the input against fac.anchor: coverage of the anchor's task features, and the "
        "missing ones with their top-activating spans (fac/).",
    )
    verb(
        "synthesize",
        "FAC Synthesis: write new samples for the features `raysel fac` finds missing "
        "(selection/synthesis/, with provenance), and report FAC before and after.",
    )
    verb(
        "evaluate",
        "Fine-tune the proxy model (evaluate.model; LoRA, TRL) on each selection and on random at the same "
        "budget, once per seed, and score each on the held-out evaluate.sets: results and intervals in evaluate/.",
    )
    shown = verb("config", "Print a config resolved (file, environment, --set) as YAML, or every default.", False)
    shown.add_argument("config", metavar="CONFIG", nargs="?", help="YAML config file")
    shown.add_argument("--defaults", action="store_true", help="every key at its default (input.paths an example)")
    shown.add_argument(
        "--reference", action="store_true", help="every key's default and meaning as Markdown (docs/config.md)"
    )
    report = verb("report", "Write report.html for a finished run.", config=False)
    report.add_argument("run_dir", metavar="RUN_DIR_OR_S3_URI")
    status = verb(
        "status",
        "Where a run stands, from its output root alone (also while it runs, from any machine that can "
        "read the root): each stage done or pending, encode shards k/N, samples/s and ETA.",
        config=False,
    )
    status.add_argument("run_dir", metavar="RUN_DIR_OR_S3_URI")
    push = verb(
        "push",
        "Upload selections (their data files and dataset card) to a Hugging Face Hub dataset repo, created "
        "if needed. The token comes from HF_TOKEN or `hf auth login`.",
        config=False,
    )
    push.add_argument("run_dir", metavar="RUN_DIR_OR_S3_URI")
    push.add_argument("--method", required=True, action="append", dest="methods",
                      help="the selection to upload, e.g. coverage; repeat it for several, one config each")  # fmt: skip
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="a branch of the repo (created if needed); default: main")
    push.add_argument("--message", help="the commit message")
    push.add_argument("--run-files", action="store_true",
                      help="also records.jsonl, selected.parquet and manifest.json (which names buckets and endpoints)")  # fmt: skip
    export = verb("export", "Write one selection in the format a trainer reads (TRL, alpaca, ShareGPT).", config=False)
    export.add_argument("run_dir", metavar="RUN_DIR_OR_S3_URI")
    export.add_argument("--method", required=True, help="the selection to export, e.g. coverage")
    export.add_argument("--format", required=True, choices=["trl", "alpaca", "sharegpt"], dest="fmt")
    export.add_argument(
        "--out", required=True, metavar="DIR", help="a local folder: train.jsonl (and dataset_info.json)"
    )
    demo = verb("demo", "Run the job on the bundled demo data with the embedded default model.", config=False)
    demo.add_argument(
        "--evaluate",
        action="store_true",
        help="then fine-tune the proxy on each selection and on random (raysel evaluate), scored on the demo's "
        "held-out math, code and general sets",
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where the results go: a folder or s3://bucket/prefix (default: runs/demo)",
    )
    force_flag(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("raysel").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    )
    try:
        if args.verb == "demo":
            cfg = demo_config(args.out, args.overrides)
        elif args.verb == "report":
            return report(args.run_dir, args.overrides)
        elif args.verb == "status":
            return status(args.run_dir, args.overrides)
        elif args.verb == "push":
            return push(args)
        elif args.verb == "export":
            return export(args)
        elif args.verb == "config":
            return show_config(args)
        else:
            cfg = load_config(args.config, args.overrides)
        verb = "evaluate" if getattr(args, "evaluate", False) else args.verb
        from raysel.pipeline import run, verb_targets

        if getattr(args, "dry_run", False):
            return dry_run(cfg, verb_targets(verb, cfg))

        force = getattr(args, "force", False)
        manifest = run(cfg, until=verb_targets(verb, cfg), train_missing_sae=args.verb == "demo", force=force)
        page = manifest["stages"].get("report", {}).get("page")
    except Exception as err:  # noqa: BLE001 -- user errors raised inside Ray tasks arrive wrapped
        cause = user_error(err)
        if cause is None:
            raise
        print(f"raysel {args.verb}: {cause}", file=sys.stderr)
        return EXIT_ERROR
    lines = summary_lines(args.verb, manifest)
    print("\n".join(lines[:-1] + ([f"  report    {page}"] if page else []) + lines[-1:]))
    return 0


def user_error(err: BaseException | None) -> Exception | None:
    """The config, input or storage error behind `err`, through Ray's wrappers; None for a bug."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConfigError, InputError, StorageError)):
            return err
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def dry_run(cfg, stages: list[str]) -> int:
    """Exit 2 when the run would fail at once: a root of another input, or an SAE that does not fit the model."""
    from raysel.plan import dry_run, plan_lines

    plan = dry_run(cfg, stages)
    print("\n".join([*plan_lines(plan), json.dumps(plan)]))
    refused = plan["root_note"].startswith("REFUSED") or str(plan["checks"].get("model", "")).startswith("MISMATCH")
    return EXIT_REFUSED if refused else 0


def push(args, api=None) -> int:
    """`raysel push RUN --method M [--method N] --repo-id ORG/NAME`; `api` stands in for the Hub's client in tests."""
    from raysel.stages.publish import PushOptions, push

    storage = run_root(args.run_dir, args.overrides)
    options = PushOptions(args.repo_id, args.private, args.revision, args.message, args.run_files)
    print(f"raysel push: {push(storage, args.methods, options, api)}")
    return 0


def run_root(run_dir: str, overrides: list[str]) -> Storage:
    """A finished (or running) run's root, reachable: --set s3.* names an S3 root's endpoint and keys."""
    storage = Storage(run_dir, load_config(None, [*overrides, 'input.paths=["unused"]']).s3)
    storage.check()
    return storage


def show_config(args) -> int:
    """`raysel config CONFIG` (resolved, secrets masked), `raysel config --defaults` or `--reference`."""
    import yaml

    if args.reference and not (args.config or args.defaults):
        from raysel.config_reference import reference

        print(reference(), end="")
        return 0
    if args.defaults == bool(args.config):
        raise ConfigError("give one of CONFIG, --defaults or --reference")
    example = ['input.paths=["data/*.jsonl"]'] if args.defaults else []
    cfg = load_config(args.config, [*example, *args.overrides])
    print(yaml.safe_dump(cfg.public_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def export(args) -> int:
    """`raysel export RUN --method M --format F --out DIR`."""
    from pathlib import Path

    from raysel.stages.export import export

    storage = run_root(args.run_dir, args.overrides)
    summary = export(storage, args.method, args.fmt, Path(args.out))
    print(f"raysel export: {summary['rows']} rows of {args.method} as {args.fmt} in {args.out}"
          + (f" ({summary['left_out']} without chat turns left out, listed in export.json)" if summary["left_out"] else ""))  # fmt: skip
    return 0


def status(run_dir: str, overrides: list[str]) -> int:
    """`raysel status RUN_DIR_OR_S3_URI`; --set s3.* reaches an S3 root."""
    from raysel.status import run_status, status_lines

    storage = run_root(run_dir, overrides)
    if not storage.exists(paths.PREPARED) and not storage.exists(paths.STAGE_MARKERS):
        print(f"raysel status: {run_dir} holds no run (no prepared/ and no stages/)", file=sys.stderr)
        return EXIT_ERROR
    print("\n".join(status_lines(run_status(storage))))
    return 0


def report(run_dir: str, overrides: list[str]) -> int:
    """`raysel report RUN_DIR_OR_S3_URI`: the run's own config says how to read it; --set s3.* reaches an S3 run."""
    from raysel.core.ray_adapter import init_ray
    from raysel.pipeline import run_stages
    from raysel.stages.report import run_config

    s3 = load_config(None, [*overrides, 'input.paths=["unused"]']).s3
    storage = Storage(run_dir, s3)
    storage.check()
    manifest = storage.read_json(paths.MANIFEST)
    if manifest is None:
        print(
            f"raysel report: {run_dir} has no manifest.json; is it the output root of a finished run?", file=sys.stderr
        )
        return EXIT_ERROR
    if "select" not in manifest["stages"]:
        print(f"raysel report: {run_dir} has no selection; run `raysel select` on it first", file=sys.stderr)
        return EXIT_ERROR
    cfg = run_config(manifest)
    init_ray(cfg.ray)
    # the run's own records stand for its stages: only the report (and spans, if never made) runs
    given = {name: record for name, record in manifest["stages"].items() if name != "report"}
    done = run_stages(cfg, storage, ["report"], given=given)["stages"]
    print(f"raysel report: {done['report']['page']}")
    return 0


def summary_lines(verb: str, manifest: dict) -> list[str]:
    """What a person wants after a run: the counts, each method's coverage, and where it all is;
    then the same as one JSON line, for scripts."""
    counts, select = manifest["counts"], manifest["stages"].get("select")
    rejected = ", ".join(f"{n} {reason}" for reason, n in sorted(counts["rejected_by_reason"].items()))
    lines = [
        f"raysel {verb}: done",
        f"  input     {counts['n_input']:,} rows: {counts['n_valid']:,} valid, {counts['n_rejected']:,} rejected"
        + (f" ({rejected}; see rejects/)" if rejected else "")
        + (f"; {counts['n_blank_lines']:,} blank lines skipped" if counts.get("n_blank_lines") else ""),
    ]
    if "n_encoded" in counts:
        failed = counts.get("n_encode_rejected")
        lines.append(
            f"  encoded   {counts['n_encoded']:,} samples into the feature store (features/)"
            + (f"; {failed:,} the encoder could not take (encode_error, see rejects/)" if failed else "")
        )
    if select:
        lines.append(f"  selected  share of the pool's {select['n_features_activated']:,} activated features covered:")
        order = [e["name"] for e in manifest["config"]["select"]["methods"] if e["name"] in select["methods"]]
        lines += [f"    {m:<9} {select['methods'][m]:.4f}  ({select['budgets'][m]:,} samples)" for m in order]
    synth = manifest["stages"].get("synthesis")
    if synth:
        lines.append(
            f"  synthesis {synth['n_kept']} samples kept for {synth['features_tried']} missing features "
            f"({synth['acceptance_rate']:.0%} of step-2 candidates above delta); "
            f"FAC {synth['fac_before']:.4f} -> {synth['fac_after']:.4f}"
        )
    fac = manifest["stages"].get("fac")
    if fac:
        lines.append(
            f"  FAC       {fac['fac']:.4f}: {fac['n_covered']} of the anchor's {fac['n_in_anchor']} task features "
            f"(frequency-weighted {fac['fac_frequency']:.4f}, magnitude-weighted {fac['fac_magnitude']:.4f}); "
            f"{len(fac['missing'])} missing, with spans in fac/"
        )
    evaluated = manifest["stages"].get("evaluate")
    if evaluated:
        lines += outcome_lines(evaluated)
    lines.append(
        f"  outputs   {manifest['output']} (manifest.json"
        + (", selection/<method>/" if select else "")
        + (", fac/" if fac else "")
        + (", evaluate/" if evaluated else "")
        + ")"
    )
    return lines + [
        json.dumps({"output": manifest["output"], **counts} | ({"coverage": select["methods"]} if select else {}))
    ]


def outcome_lines(evaluated: dict) -> list[str]:
    """Each method's mean metric per eval set over the seeds, and its paired difference against random."""
    summary = evaluated["summary"]

    def cell(e: dict) -> str:
        delta, ci = e.get("delta_vs_random"), e.get("delta_ci")
        against = "" if delta is None else f" ({delta:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + ")"
        return f"{e['mean']:.4f}{against}"

    lines = [f"  evaluate  {evaluated['n_finetunes']} proxy fine-tunes; per eval set, the mean over seeds "
             "(method - random on the same seeds, 95 % interval):"]  # fmt: skip
    for method, sets in summary["by_method"].items():
        cells = [f"{s} {m} {cell(e)}" for s, metrics in sets.items() for m, e in metrics.items()]
        lines.append(f"    {method:<9} " + "; ".join(cells))
    base = [f"{s} {m} {v:.4f}" for s, metrics in summary["base"].items() for m, v in metrics.items() if v is not None]
    return lines + [f"    {'base':<9} " + "; ".join(base) + " (the proxy without an adapter)"]


if __name__ == "__main__":
    sys.exit(main())
