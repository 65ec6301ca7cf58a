"""A sae-lens release through SAE.from_pretrained, the real code path, offline: the release's files
laid out in an HF cache as the Hub lays them out, with HF_HUB_OFFLINE=1. The driver reads its config
(width, hook) without its weights, and the encoder's features equal those of the same SAE read from
a folder."""

import json
import shutil

import huggingface_hub.constants
import pytest

from raysel.config import RunConfig
from raysel.core.encoder import Encoder
from raysel.core.sae import sae_metadata
from raysel.core.section import ConfigError

# gpt2-small-res-jb: a release sae-lens loads with its own (sae_lens) loader; its sae_id is the folder
RELEASE, REPO, SAE_ID = "gpt2-small-res-jb", "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.2.hook_resid_pre"
TEXTS = ["<|user|>Name a prime number.\n<|assistant|>Seven is prime.\n", "Plain text for the encoder."]


@pytest.fixture
def offline_hub(tiny_sae_dir, tmp_path, monkeypatch):
    """The release's folder in an HF cache: refs/main names a snapshot that holds the SAE's files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    folder = repo / "snapshots" / commit / SAE_ID
    folder.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(tiny_sae_dir / name, folder / name)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = SAE_ID  # the input of block 2: the output of block 1
    (folder / "cfg.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return folder


def stack(model_dir, **sae):
    raw = {
        "input": {"paths": ["-"]},
        "model": {"name": str(model_dir), "dtype": "float32"},
        "sae": sae,
        "encode": {"skip_prefix": False},
    }
    return RunConfig.model_validate(raw).stack()


def test_a_release_loads_offline_from_the_hf_cache(tiny_model_dir, offline_hub):
    released = stack(tiny_model_dir, release=RELEASE, sae_id=SAE_ID)
    meta = sae_metadata(released)
    assert (meta["d_in"], meta["d_sae"], meta["layer"]) == (64, 128, 1)
    assert meta["identity"] == f"{RELEASE}/{SAE_ID}"
    from_release = Encoder(released)(["a", "b"], TEXTS).to_pylist()
    from_folder = Encoder(stack(tiny_model_dir, path=str(offline_hub)))(["a", "b"], TEXTS).to_pylist()
    assert from_release == from_folder and from_release[0]["feat_ids"]


def test_a_release_that_is_neither_reachable_nor_cached_is_a_config_error(tiny_model_dir, offline_hub):
    with pytest.raises(ConfigError, match="sae.release: cannot read the config of gpt2-small-res-jb/blocks.5"):
        sae_metadata(stack(tiny_model_dir, release=RELEASE, sae_id="blocks.5.hook_resid_pre"))
