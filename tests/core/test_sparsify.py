"""EleutherAI sparsify checkpoints (cfg.json + sae.safetensors in a folder named for its hookpoint)
read as sae-lens TopK SAEs: the activations equal sparsify's own encode, and the encoder reads them at
the hookpoint the folder names."""

import torch
from sparsify import SparseCoder, SparseCoderConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysel.config import RunConfig
from raysel.core.encoder import Encoder
from raysel.core.sae import load_sae, sae_metadata, weights_digest


def sparsify_checkpoint(out, d_in: int = 64, latents: int = 128, k: int = 8) -> SparseCoder:
    torch.manual_seed(0)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=latents, k=k))
    with torch.no_grad():  # non-zero biases, so that where each one applies is tested
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
    coder.save_to_disk(out)
    return coder


def stack(sae_dir, model_dir=None):
    raw = {"input": {"paths": ["-"]}, "sae": {"path": str(sae_dir)}, "encode": {"skip_prefix": False}}
    return RunConfig.model_validate(
        raw | ({"model": {"name": str(model_dir), "dtype": "float32"}} if model_dir else {})
    ).stack()


def dense(coder: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    out = coder.encode(x)
    return torch.zeros(x.shape[0], coder.num_latents).scatter(1, out.top_indices, out.top_acts)


def test_activations_equal_sparsifys_own_encode(tmp_path):
    coder = sparsify_checkpoint(tmp_path / "layers.1")
    meta = sae_metadata(stack(tmp_path / "layers.1"))
    assert (meta["d_in"], meta["d_sae"], meta["layer"], meta["architecture"]) == (64, 128, 1, "topk (sparsify)")
    assert len(weights_digest(stack(tmp_path / "layers.1"))) == 16
    x = torch.randn(50, 64)
    with torch.no_grad():
        ours = load_sae(stack(tmp_path / "layers.1"), "cpu").encode(x)
        torch.testing.assert_close(ours, dense(coder, x), rtol=1e-5, atol=1e-6)
    assert (ours > 0).sum(1).max() == 8


def test_the_encoder_reads_a_sparsify_sae_at_the_hookpoint_its_folder_names(tiny_model_dir, tmp_path):
    coder = sparsify_checkpoint(tmp_path / "layers.2")
    encoder = Encoder(stack(tmp_path / "layers.2", tiny_model_dir))
    assert encoder.layer == 2
    texts = ["<|user|>Name a prime number.\n<|assistant|>Seven is prime.\n", "Plain text, a little longer than that."]
    rows = encoder(["a", "b"], texts).to_pylist()
    model, tok = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    for row, text in zip(rows, texts, strict=True):
        with torch.no_grad():
            h = model(torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states[3][0, 1:]
            reference = dense(coder, h).max(0).values
        ids = reference.nonzero().flatten().tolist()
        assert row["feat_ids"] == ids and ids
        torch.testing.assert_close(torch.tensor(row["feat_max"]), reference[ids], rtol=1e-4, atol=1e-5)
