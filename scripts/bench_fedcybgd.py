"""FedCyBGD vs full-parameter FedAvg (one client per round) on the same model: client memory and bytes.

    python scripts/bench_fedcybgd.py [--rounds 8] [--clients 4] [--blocks 2,4,8] [override ...]

Both run full-parameter training (``lora.enabled=false``) on the same model, data and local steps,
one client per round (FedAvg: ``clients_per_round=1``). Reported per strategy: the client's peak held
bytes over the rounds (``mem/client_peak_bytes``: parameters it holds + gradients + AdamW state,
measured from its tensors), with CUDA the measured peak allocation during local training (the
simulation keeps the whole resident model on the device, so this includes dropped layers), total
bytes on the wire, and the final eval loss. Default model: the tiny Llama widened to 8 layers x 256.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from fedtune.client.runtime import ClientContext  # noqa: E402
from fedtune.config import compose_config  # noqa: E402
from fedtune.run import run  # noqa: E402

MODEL = ["model.builder.hidden_size=256", "model.builder.num_layers=8", "model.builder.intermediate_size=512"]
CUDA_PEAKS: list[int] = []


def _measure_cuda_during_training() -> None:
    """Record the CUDA peak allocation of every local training call (no-op without CUDA)."""
    if not torch.cuda.is_available():
        return
    original = ClientContext.train

    def train(self, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = original(self, **kwargs)
        CUDA_PEAKS.append(torch.cuda.max_memory_allocated())
        return result

    ClientContext.train = train


def one(overrides: list[str]) -> dict[str, float]:
    out = Path(tempfile.mkdtemp()) / "run"
    CUDA_PEAKS.clear()
    summary = run(compose_config(overrides), out_dir=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "peak": max(r["mem/client_peak_bytes"] for r in rows),
        "cuda": max(CUDA_PEAKS) if CUDA_PEAKS else None,
        "total": summary["comm/total_bytes"],
        "loss": rows[-1]["eval/loss"],
        "params": summary["model/total_params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--blocks", default="2,4,8")
    parser.add_argument("--prune-ratio", type=float, default=0.1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    _measure_cuda_during_training()
    common = ["logger=none", "lora.enabled=false", f"num_rounds={args.rounds}", f"num_clients={args.clients}",
              f"local.max_steps={args.steps}", "local.lr=1e-3", "eval.bleu_samples=0", *MODEL, *args.overrides]
    runs = {"fedavg (full, 1 client/round)": one([*common, "strategy=fedavg", "clients_per_round=1"])}
    for b in args.blocks.split(","):
        runs[f"fedcybgd B={b} p={args.prune_ratio}"] = one(
            [*common, "strategy=fedcybgd", f"strategy.num_blocks={b}", f"strategy.prune_ratio={args.prune_ratio}"])
    base = next(iter(runs.values()))
    w = sys.stdout.write
    w(f"{base['params']:,} params, {args.rounds} rounds, {args.clients} clients, {args.steps} steps/round\n\n")
    w("| strategy | client peak bytes | vs fedavg | CUDA peak (train) | total bytes | vs fedavg | eval loss |\n")
    w("|---|---:|---:|---:|---:|---:|---:|\n")
    for name, r in runs.items():
        cuda = f"{r['cuda']:,}" if r["cuda"] is not None else "n/a"
        w(f"| {name} | {r['peak']:,} | {r['peak'] / base['peak'] - 1:+.1%} | {cuda} | {r['total']:,} | "
          f"{r['total'] / base['total'] - 1:+.1%} | {r['loss']:.3f} |\n")


if __name__ == "__main__":
    main()
