"""Model load time (cold and warm) and training throughput, per model and quantization.

    python scripts/bench_models.py [--rows tiny,minilm,smollm2-135m,smollm2-135m:nf4,smollm2-135m:int8]
                                   [--steps 4] [--batch 8] [--seq 128] [--threads 2]

Each row runs in a fresh process: it builds the tokenizer and model the way a run does
(``model.builder`` with the ``quant`` config) and times that ("load"), adds LoRA r=8 on the model's
default targets, then trains ``--steps`` steps of ``--batch`` x ``--seq`` tokens (every position a
real token: random ids, so tokens/s is not flattered by padding) with AdamW and prints the best
step's tokens/s and the median.

Load: "cold" converts the packaged GGUF again into an empty ``$FEDTUNE_CACHE`` (first run on a
machine); "warm" loads the cached safetensors (every later run). Only models with a packaged
conversion have a cold column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchlib import child_env

CHILD = r"""
import json, sys, time
t_import = time.perf_counter()
import torch
from fedtune.config import build, compose_config, to_container
from fedtune.data.sources import load_splits
from fedtune.data.tasks import corpus
from fedtune.models.lora import apply_lora, count_parameters
from fedtune.models.quant import base_bytes
model_name, quant_name, steps, batch, seq, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(threads)
head = model_name == "minilm"
cfg = compose_config([f"model={model_name}", f"quant={quant_name}", "lora.r=8", "logger=none"])
texts = corpus(load_splits(cfg.data))  # the tiny model's vocabulary: the default data's
quant = to_container(cfg.quant) if cfg.quant.load_in else None
t0 = time.perf_counter()  # tokenizer + model: a cold start converts the GGUF on the first of them
tokenizer = build(cfg.model.tokenizer, texts=texts)
model = build(cfg.model.builder, tokenizer=tokenizer, quant=quant, num_labels=4 if head else None)
load_s = time.perf_counter() - t0
model = apply_lora(model, cfg.lora, default_targets=cfg.model.lora_target_modules,
                   default_modules_to_save=cfg.model.get("lora_modules_to_save"),
                   fan_in_fan_out=cfg.model.fan_in_fan_out, task_type="SEQ_CLS" if head else "CAUSAL_LM")
trainable, total = count_parameters(model)
vocab = model.get_input_embeddings().num_embeddings
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (batch, seq), generator=g)
labels = torch.randint(0, 4, (batch,), generator=g) if head else ids
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
model.train()
times = []
for _ in range(steps):
    t = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "step_s": times, "trainable": trainable, "total": total,
                  "base_bytes": base_bytes(model), "loss": float(loss)}))
"""


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_row(model: str, quant: str, args: argparse.Namespace, *, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, quant, str(args.steps), str(args.batch), str(args.seq),
                          str(args.threads)], check=True, env=child_env(FEDTUNE_CACHE=cache), capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="tiny,minilm,smollm2-135m,smollm2-135m:nf4,smollm2-135m:int8")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warm_cache = os.environ.get("FEDTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedtune")
    say(f"batch {args.batch} x {args.seq} tokens, fp32 compute, LoRA r=8, {args.threads} threads, "
        f"{args.steps} steps (the first includes warm-up)")
    say()
    say("| model | quant | trainable / total params | base bytes | load cold (s) | load warm (s) "
        "| tokens/s best step | tokens/s median |")
    say("|---|---|---|---:|---:|---:|---:|---:|")
    cold_done: set[str] = set()
    for row in args.rows.split(","):
        model, _, quant = row.partition(":")
        quant = quant or "none"
        cold = "–"
        if model == "smollm2-135m" and model not in cold_done:  # the packaged GGUF, converted afresh
            with tempfile.TemporaryDirectory() as empty:
                cold = f"{run_row(model, quant, args, cache=empty)['load_s']:.1f}"
            cold_done.add(model)
        r = run_row(model, quant, args, cache=warm_cache)
        tokens = args.batch * args.seq
        best = tokens / min(r["step_s"])
        median = tokens / statistics.median(r["step_s"])
        say(f"| {model} | {quant} | {r['trainable']:,} / {r['total']:,} | {r['base_bytes']:,} | {cold} "
            f"| {r['load_s']:.1f} | {best:,.0f} | {median:,.0f} |")


if __name__ == "__main__":
    main()
