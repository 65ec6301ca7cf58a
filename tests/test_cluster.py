"""cluster/ holds what a user deploys; these parse it and check that it names entrypoints, files,
config keys and versions that exist."""

import re
import shlex

import ray
import yaml

from raysel.cli import build_parser
from raysel.config import RunConfig, load_config
from raysel.pipeline import VERBS
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def entrypoint_config(command: list[str]) -> RunConfig:
    """What `python jobs/run.py VERB CONFIG [--set K=V ...]` would run, validated as the job would."""
    assert command[:2] == ["python", "jobs/run.py"] and (REPO / command[1]).is_file()
    args = build_parser().parse_args(command[2:])  # the CLI's own parser: the job takes its syntax
    config = args.config
    assert (REPO / config).is_file(), f"{config} is not in the repository (the image copies it)"
    return load_config(str(REPO / config), args.overrides)


def test_the_rayjob_runs_the_job_entrypoint_on_a_gpu_worker_group_sized_to_the_encode_pool():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cfg = entrypoint_config(shlex.split(job["spec"]["entrypoint"]))
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    [workers] = spec["workerGroupSpecs"]
    [container] = workers["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and workers["maxReplicas"] * gpus >= cfg.encode.actors * cfg.encode.num_gpus
    cpus = int(container["resources"]["limits"]["cpu"])
    assert cpus >= cfg.encode.num_cpus * gpus / cfg.encode.num_gpus, "the node must hold its actors' CPUs"
    head = spec["headGroupSpec"]["template"]["spec"]
    [head_container] = head["containers"]
    assert head_container["image"] == container["image"] + "-cpu", "the head runs the same raysel, CPU build"
    # one HF cache for the cluster (a hub model downloaded once) and a token for a gated model, on every pod
    for pod, c in [(head, head_container), (workers["template"]["spec"], container)]:
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        [home] = [e["value"] for e in c["env"] if e["name"] == "HF_HOME"]
        assert mounts["hf-cache"] == home and "persistentVolumeClaim" in volumes["hf-cache"]
        assert {"name": "raysel-hf", "optional": True} in [s["secretRef"] for s in c["envFrom"]]
    assert cfg.output.root.startswith("s3://") and cfg.model.dtype == "auto" and cfg.encode.num_gpus >= 1


def test_the_autoscaler_config_has_a_gpu_worker_type_that_fits_the_encode_pool():
    launcher = load("autoscaler.yaml")
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    submit = re.search(
        r"ray job submit .*? -- (python jobs/run\.py[^\n]*)", (CLUSTER / "autoscaler.yaml").read_text()
    ).group(1)
    cfg = entrypoint_config(shlex.split(submit))
    gpu_types = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert sum(t["max_workers"] for t in gpu_types) >= cfg.encode.actors * cfg.encode.num_gpus
    assert launcher["max_workers"] >= cfg.encode.actors * cfg.encode.num_gpus
    assert launcher["provider"]["type"] == "aws" and launcher["docker"]["head_image"] == image_of("rayjob.yaml")
    assert launcher["docker"]["image"] + "-cpu" == launcher["docker"]["head_image"]


def image_of(name: str) -> str:
    [container] = load(name)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return container["image"]


def test_the_image_is_rays_at_the_pinned_version_and_copies_what_the_job_runs():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-\$\{VARIANT\}$", dockerfile, re.M)
    assert re.search(r"^ARG VARIANT=gpu$", dockerfile, re.M) and 'if [ "$VARIANT" = cpu ]' in dockerfile
    # the image's Ray is the tested one: the version constraints.txt pins, which the image installs with
    assert base and base.group(1) == ray.__version__
    assert f"\nray=={base.group(1)}\n" in (REPO / "constraints.txt").read_text()
    assert "-c constraints.txt" in dockerfile
    for src in re.findall(r"^COPY --chown=ray (.+?) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    for needed in ("jobs", "cluster", "raysel"):
        assert re.search(rf"^COPY .*\b{needed}\b", dockerfile, re.M), needed


def test_every_config_key_the_guide_names_exists():
    guide = (CLUSTER / "README.md").read_text()
    named = re.findall(r"`([a-z_][a-z0-9_]*\.[a-z0-9_]+)(?::[^`]*)?`", guide)
    keys = {k for k in named if k.rsplit(".", 1)[1] not in ("yaml", "toml", "py", "md")}  # not file names
    assert len(keys) > 10
    fields = RunConfig.model_fields
    for key in keys:
        section, name = key.split(".")
        assert section in fields and name in fields[section].annotation.model_fields, key
    sentence = re.search(r"`jobs/run.py` takes exactly the CLI's syntax[^.]*\.", guide).group(0)
    assert set(re.findall(r"`([a-z-]+)`", sentence)) == {v for v in VERBS if v not in ("demo", "report")}
    assert "ray job submit" in guide and "encode.actors" in guide
