"""Peak memory vs the number of clients: one resident base model, clients are adapters.

    python scripts/bench_memory.py [--models tiny,smollm2-135m] [--clients 2,10,100] [override ...]

Each configuration (N clients, all in 1 round) runs in a fresh process and reports its peak RSS;
the target is 100 clients <= 1.1 x the peak of 2 clients. Checkpoints are on (the default
checkpoint.every=1, so the last round writes one): a checkpoint must not undo the store's limit. The `local` strategy is included because
it keeps every client's adapter and AdamW state in the client store (the worst case for memory);
`local@64` is the same with `store.max_memory_mb=64`: the store spills to the run folder beyond that.
"""

from __future__ import annotations

import argparse
import sys

from benchlib import run_child

PER_MODEL = {
    "tiny": ["data.source.num_train=2000"],
    "smollm2-135m": ["data=alpaca", "data.path=../shared/data/alpaca_seed_tasks/seed_tasks.jsonl",
                     "local.max_seq_len=64", "eval.max_samples=4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--clients", default="2,10,100")
    parser.add_argument("--strategies", default="fedavg,local,local@64",
                        help="strategy names; name@MB sets store.max_memory_mb=MB")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.stdout.write("| model | strategy | clients | peak RSS | vs 2 clients |\n|---|---|---:|---:|---:|\n")
    for model in args.models.split(","):
        for variant in args.strategies.split(","):
            strategy, _, store_mb = variant.partition("@")
            store = [f"store.max_memory_mb={store_mb}"] if store_mb else []
            base = None
            for n in (int(c) for c in args.clients.split(",")):
                _, peak = run_child([f"model={model}", f"strategy={strategy}", *store, f"num_clients={n}", "num_rounds=1",
                                     "local.max_steps=1", "local.batch_size=1", "eval.bleu_samples=0",
                                     "threads=1", *PER_MODEL.get(model, []), *args.overrides])
                base = base or peak
                sys.stdout.write(f"| {model} | {variant} | {n} | {peak / 2**20:.0f} MiB | {peak / base:.2f}x |\n")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
