"""raysel's encoder against two baselines, side by side in one process.

All read the same samples of pool.jsonl (rendered with the chat template, up
to --max-tokens tokens each) with the default model and SAE, run one warm-up
batch and then one timed pass:

- naive: the full model with output_hidden_states, corpus-order batches of
  --naive-batch padded to the longest sample, a dense sae-lens encode of every position;
- careful: what a careful sae-lens user writes: the model stopped at the hook layer,
  the same fixed-size corpus-order batches padded to the batch maximum, a dense encode;
- raysel: raysel.core.encoder.Encoder (model cut at the hook layer, length buckets,
  padding dropped before the SAE, the TopK read off sparse, sparse pooled output);
- raysel in bf16 (model.dtype bfloat16), for its speed and active-set Jaccard against fp32.

All pool the same positions (no padding, not position 0), in fp32 unless said. The matmul
peak is measured in the same run. The last line printed is one JSON object.

With --d-sae W1,W2,... it also encodes the same samples with a random-init TopK SAE (k 32) of each
width on the default model's layer 15, each width in a fresh process so that its peak RSS is its
own, and reports samples/s and peak RSS per width (`by_d_sae`).

    python benchmarks/encode.py [--pool ../shared/data/pool.jsonl] [--n 256] [--d-sae 16384,65536,131072]
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the stdlib's `select` for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from raysel.config import FieldMap, RunConfig  # noqa: E402
from raysel.core.encoder import Encoder  # noqa: E402
from raysel.core.models import load_model, load_tokenizer  # noqa: E402
from raysel.core.records import chat_template_for, normalize, render  # noqa: E402
from raysel.core.sae import default_sae_source, load_sae  # noqa: E402
from raysel.core.spans import TopSpans  # noqa: E402
from raysel.stages.train_sae import save_sae, train_sae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="../shared/data/pool.jsonl")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--naive-batch", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--d-sae", default="", help="comma-separated SAE widths to sweep, e.g. 16384,65536,131072")
    parser.add_argument("--width-child", type=int, default=0, help=argparse.SUPPRESS)  # one width, in a child
    args = parser.parse_args()
    if args.device == "auto":  # one process on this machine: its own GPU, if it has one
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.width_child:
        return width_child(args)

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg = RunConfig.model_validate(
        {
            "input": {"paths": [args.pool]},
            "prepare": {"max_tokens": args.max_tokens},
            "model": {"dtype": "float32"},  # the comparisons are in fp32; bf16 is measured on its own below
            "encode": {
                "device": args.device,
                "num_gpus": int(args.device == "cuda"),
                "num_cpus": threads,
                "skip_prefix": False,
            },
        }
    )
    tokenizer = load_tokenizer(cfg.model)
    ids, texts = load_samples(args.pool, args.n, tokenizer)
    stack = cfg.stack()
    if default_sae_source(stack) is None:
        print("no default SAE yet: training it with train_sae defaults (about 2 minutes on 2 cores)")
        summary, files = train_sae(stack, texts * 4)  # on this process's device, as the encoder runs
        save_sae(stack, files, summary)

    encoder = Encoder(stack)
    device = encoder.device
    peak = matmul_peak_gflops(device)
    naive = BaselineEncoder(cfg, device, encoder.layer, args.naive_batch, stop_at_hook=False)
    careful = BaselineEncoder(cfg, device, encoder.layer, args.naive_batch, stop_at_hook=True)

    # raysel's side does what its encode stage does: the pooled features and each shard's span candidates
    ours, ours_s = timed(lambda t: encoder(ids[: len(t)], t, TopSpans()), texts)
    naive_max, naive_s = timed(naive, texts)
    careful_max, careful_s = timed(careful, texts)
    del naive, careful
    bf16 = Encoder(cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})}).stack())
    ours_bf16, bf16_s = timed(lambda t: bf16(ids[: len(t)], t, TopSpans()), texts)

    enc = tokenizer(texts, truncation=True, max_length=args.max_tokens)["input_ids"]
    real_tokens = sum(len(x) for x in enc)
    padded_ours = sum(len(enc[b[0]]) * len(b) for b in encoder.length_buckets(enc))
    counted = int(np.sum(ours["n_tokens"].to_numpy()))
    # the model's linear layers on every padded position, and the SAE's encoder on the counted ones (its
    # decoder never runs)
    flops = 2 * linear_params(encoder.model) * padded_ours + 2 * encoder.sae.cfg.d_in * encoder.sae.cfg.d_sae * counted
    achieved = flops / ours_s / 1e9
    buf = io.BytesIO()
    pq.write_table(ours, buf)
    agreement, careful_agreement = compare(ours, naive_max), compare(ours, careful_max)

    result = {
        "samples_per_s": round(len(texts) / ours_s, 2),
        "naive_samples_per_s": round(len(texts) / naive_s, 2),
        "speedup_vs_naive": round(naive_s / ours_s, 2),
        "careful_samples_per_s": round(len(texts) / careful_s, 2),
        "speedup_vs_careful": round(careful_s / ours_s, 2),
        "careful_max_abs_diff_feat_max": careful_agreement["max_abs_diff"],
        "careful_active_set_jaccard": careful_agreement["jaccard"],
        "bf16_samples_per_s": round(len(texts) / bf16_s, 2),
        "bf16_speedup": round(ours_s / bf16_s, 2),
        "bf16_active_jaccard": active_jaccard(ours, ours_bf16),
        "tokens_per_s": round(real_tokens / ours_s, 1),
        "naive_tokens_per_s": round(real_tokens / naive_s, 1),
        "achieved_gflops": round(achieved, 1),
        "matmul_peak_gflops": round(peak, 1),
        "fraction_of_matmul_peak": round(achieved / peak, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "bytes_per_sample": round(buf.tell() / len(texts), 1),
        "n_samples": len(texts),
        "real_tokens": real_tokens,
        "padded_tokens_raysel": padded_ours,
        "padded_tokens_baselines": padded_tokens(enc, args.naive_batch),
        "layer": encoder.layer,
        "device": device,
        "threads": threads,
        "max_abs_diff_feat_max": agreement["max_abs_diff"],
        "active_set_jaccard": agreement["jaccard"],
    }
    print(f"{'':8} {'samples/s':>10} {'tokens/s':>10} {'padded tokens':>14}")
    for name, key in (("naive", "naive_samples_per_s"), ("careful", "careful_samples_per_s"),
                      ("raysel", "samples_per_s"), ("bf16", "bf16_samples_per_s")):  # fmt: skip
        print(f"{name:8} {result[key]:>10} samples/s")
    print(
        f"speedup vs naive {result['speedup_vs_naive']}x, vs careful {result['speedup_vs_careful']}x; "
        f"{achieved:.0f} GFLOP/s of a {peak:.0f} GFLOP/s matmul peak ({100 * result['fraction_of_matmul_peak']:.0f}%); "
        f"padded tokens {padded_ours} against the baselines' {result['padded_tokens_baselines']}; features agree "
        f"with naive (max |diff| {agreement['max_abs_diff']:.2e}, Jaccard {agreement['jaccard']:.4f}) and careful "
        f"(max |diff| {careful_agreement['max_abs_diff']:.2e}, Jaccard {careful_agreement['jaccard']:.4f}); "
        f"bf16 {result['bf16_speedup']}x fp32's speed, active-set Jaccard {result['bf16_active_jaccard']}"
    )
    if args.d_sae:
        result["by_d_sae"] = {int(w): run_width(args, int(w)) for w in args.d_sae.split(",")}
        widths = sorted(result["by_d_sae"])
        low, high = result["by_d_sae"][widths[0]], result["by_d_sae"][widths[-1]]
        result["rss_ratio_widest_vs_narrowest"] = round(high["peak_rss_gb"] / low["peak_rss_gb"], 2)
        result["speed_ratio_widest_vs_narrowest"] = round(high["samples_per_s"] / low["samples_per_s"], 2)
        for w in widths:
            r = result["by_d_sae"][w]
            print(f"d_sae {w:>7}: {r['samples_per_s']:>6} samples/s, encoder process peak RSS {r['peak_rss_gb']} GB")
    print(json.dumps(result))


def run_width(args, width: int) -> dict:
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--width-child", str(width), "--pool", args.pool,
           "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--device", args.device]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def width_child(args) -> None:
    """Encode the samples with a random-init TopK SAE of `args.width_child` latents; one JSON line."""
    import tempfile

    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=args.width_child, k=32,
                                    metadata=SAEMetadata(hook_name="model.layers.15")))  # fmt: skip
        with torch.no_grad():
            sae.W_enc.normal_(0, 576**-0.5)
            sae.W_dec.copy_(sae.W_enc.T)
        sae.save_model(tmp)
        del sae
        cfg = RunConfig.model_validate({
            "input": {"paths": [args.pool]}, "prepare": {"max_tokens": args.max_tokens}, "sae": {"path": tmp},
            "model": {"dtype": "float32"},
            "encode": {"device": args.device, "num_gpus": int(args.device == "cuda"), "num_cpus": threads,
                       "skip_prefix": False},
        })  # fmt: skip
        ids, texts = load_samples(args.pool, args.n, load_tokenizer(cfg.model))
        encoder = Encoder(cfg.stack())
        encoder(ids[:16], texts[:16])  # warm-up
        start = time.perf_counter()
        encoder(ids, texts)
        seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report its parent's peak
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"samples_per_s": round(len(texts) / seconds, 2), "peak_rss_gb": round(hwm_kb / 2**20, 2)}))


def load_samples(pool: str, n: int, tokenizer) -> tuple[list[str], list[str]]:
    template = chat_template_for(tokenizer, "auto")
    ids, texts = [], []
    with open(pool) as f:
        for line in f:
            record = json.loads(line)
            sample = normalize(record, FieldMap(id="id"))
            ids.append(sample.id)
            texts.append(render(sample, tokenizer, template))
            if len(texts) == n:
                break
    return ids, texts


class BaselineEncoder:
    """Corpus-order batches padded to their longest sample, a dense SAE encode of every position.
    stop_at_hook=False runs the full model with output_hidden_states (naive); True stops the model at
    the hook layer, as a careful user does (the blocks after it and the final norm dropped)."""

    def __init__(self, cfg: RunConfig, device: str, layer: int, batch: int, stop_at_hook: bool):
        self.model = load_model(cfg.model, device)
        if stop_at_hook:
            self.model = self.model.model
            self.model.layers = self.model.layers[: layer + 1]
            self.model.norm = torch.nn.Identity()
        self.tokenizer = load_tokenizer(cfg.model)
        self.sae = load_sae(cfg.stack(), device).eval()
        self.layer, self.batch, self.device, self.stop_at_hook = layer, batch, device, stop_at_hook
        self.max_tokens = cfg.prepare.max_tokens

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        pooled = []
        for i in range(0, len(texts), self.batch):
            enc = self.tokenizer(
                texts[i : i + self.batch],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            if self.stop_at_hook:
                hidden = self.model(**enc).last_hidden_state
            else:
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.layer + 1]
            z = self.sae.encode(hidden.to(self.sae.dtype))  # (batch, seq, d_sae), padding included
            keep = enc["attention_mask"].bool().clone()
            keep[:, 0] = False
            z = torch.where(keep[..., None], z, torch.zeros_like(z))
            pooled.extend(z.max(dim=1).values.float().cpu())
        return pooled


def timed(encode, texts: list[str]):
    """One warm-up batch, then one timed pass over `texts`: (its output, seconds)."""
    encode(texts[:16])
    start = time.perf_counter()
    out = encode(texts)
    return out, time.perf_counter() - start


def padded_tokens(enc: list[list[int]], batch: int) -> int:
    return sum(max(len(x) for x in enc[i : i + batch]) * len(enc[i : i + batch]) for i in range(0, len(enc), batch))


def active_jaccard(a, b) -> float:
    """Jaccard of the (sample, feature) pairs active in two feature-store tables of the same samples."""
    pairs = [{(i, f) for i, fs in enumerate(t["feat_ids"].to_pylist()) for f in fs} for t in (a, b)]
    return round(len(pairs[0] & pairs[1]) / max(len(pairs[0] | pairs[1]), 1), 4)


def compare(ours, naive_max: list[torch.Tensor]) -> dict:
    diff, inter, union = 0.0, 0, 0
    for row, ref in zip(ours.to_pylist(), naive_max):
        dense = torch.zeros_like(ref)
        dense[row["feat_ids"]] = torch.tensor(row["feat_max"])
        diff = max(diff, (dense - ref).abs().max().item())
        a, b = set(row["feat_ids"]), set(ref.nonzero().flatten().tolist())
        inter, union = inter + len(a & b), union + len(a | b)
    return {"max_abs_diff": diff, "jaccard": inter / max(union, 1)}


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_peak_gflops(device: str, n: int = 2048, repeats: int = 10) -> float:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


if __name__ == "__main__":
    main()
