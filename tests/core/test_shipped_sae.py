"""The default SAE that ships with raysel: which runs read it, and under which name."""

import shutil

from raysel.cli import demo_config
from raysel.core.sae import SHIPPED, WEIGHTS, default_sae_name, default_sae_source, sae_metadata


def demo_stack(tmp_path, *overrides):
    return demo_config(str(tmp_path / "out"), [f"model.cache_dir={tmp_path / 'cache'}", *overrides]).stack()


def test_the_demo_reads_the_shipped_sae_unless_train_sae_made_one_or_its_settings_differ(tmp_path):
    """Would catch: a demo that trains on first use again, a shipped SAE used for other train_sae
    settings than it was trained with, or one that hides the SAE a user trained."""
    stack = demo_stack(tmp_path)
    shipped = SHIPPED / default_sae_name(stack)
    assert (shipped / WEIGHTS).is_file() and default_sae_source(stack) == str(shipped)
    assert default_sae_source(demo_stack(tmp_path, "train_sae.lr=0.002")) is None  # the pipeline then trains
    assert default_sae_source(demo_stack(tmp_path, f"train_sae.output={tmp_path / 'mine'}")) is None
    trained = tmp_path / "cache" / "saes" / default_sae_name(stack)
    shutil.copytree(shipped, trained)
    assert default_sae_source(stack) == str(trained)  # train-sae's own, once it made one


def test_the_shipped_sae_is_known_by_its_name_not_by_where_the_package_is_installed(tmp_path):
    """Would catch: a fresh clone or a new install refusing the feature store a demo wrote (the
    encode fingerprint holds the SAE's identity)."""
    stack = demo_stack(tmp_path)
    meta = sae_metadata(stack)
    assert meta["identity"] == f"raysel's shipped {default_sae_name(stack)}"
    assert str(SHIPPED) not in meta["identity"] and (meta["d_in"], meta["d_sae"], meta["layer"]) == (576, 2048, 15)
