"""Where does an uplink codec lose? Per round and per tensor group, how the server's decoded mean compares
with the mean of what the clients computed; and other codecs on the same real updates.

    python scripts/diagnose_codec.py --task banking77 --setting randk0.75+sign [--rounds 10] [--seed 0]
        [--groups classifier,lora_A,lora_B] [--codecs sign,tern,...] [--keep-rounds 3] [--out F.json]
        [override ...]

Runs one setting of ``bench_compression.py`` (same task sizing, ``engine=sequential`` so that one process
sees every client) in-process and records, for every client upload, the update the client computed (before
error feedback) and what the server decodes (that update plus the client's previous residual, coded).
Per round and group (the tensors whose name contains the group's pattern; ``rest`` for the others):

- ``agree``: ||mean computed update|| / mean ||client's computed update||: 1 when the clients agree,
  1/sqrt(K) (printed beside it) when their updates are orthogonal;
- ``pair cos``: the mean cosine between two clients' computed updates;
- ``cos`` and ``rel err``: cosine and ||mean decoded - mean computed|| / ||mean computed||, the mean decoded
  upload against the mean computed update (error feedback delays part of each update, so the error is
  not all lost: the next rounds carry it);
- ``norm``: ||mean decoded|| / ||mean computed||;
- ``backlog``: ||sum of the residuals after this round|| / ||sum of this round's computed updates||.

With ``--codecs``, each codec is also applied, without error feedback, to the computed updates of the
first ``--keep-rounds`` rounds (the same real tensors for every codec): bits a value through a channel with
the compact wire and zstd (every payload after the client's first, which carries the name table), the
ratio to fp32 (32 bits), each client's relative L2 error and that of the mean over the round's clients.

Means are unweighted (the server weights by examples: close, not equal).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compression as bench  # noqa: E402

import fedtune.client.runtime as runtime  # noqa: E402
from fedtune.comm.channel import Channel, Message  # noqa: E402
from fedtune.comm.feedback import compress_with_feedback  # noqa: E402
from fedtune.comm.spec import make_codec  # noqa: E402

Flat = dict[str, torch.Tensor]


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _cat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().float().reshape(-1) for k in names])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def fidelity(clients: list[dict], names: list[str]) -> dict:
    """The per-round numbers of one group from each client's computed / decoded / residual tensors."""
    computed = [_cat(c["computed"], names) for c in clients]
    decoded = [_cat(c["decoded"], names) for c in clients]
    k = len(clients)
    mean_c, mean_d = sum(computed) / k, sum(decoded) / k
    pairs = [float(torch.nn.functional.cosine_similarity(computed[i], computed[j], dim=0))
             for i in range(k) for j in range(i + 1, k)]
    residual = sum(_cat(c["residual"], names) for c in clients)
    return {"values": computed[0].numel(), "clients": k,
            "agree": float(mean_c.norm() / (sum(c.norm() for c in computed) / k)),
            "pair_cos": sum(pairs) / len(pairs) if pairs else float("nan"),
            "cos": float(torch.nn.functional.cosine_similarity(mean_d, mean_c, dim=0)),
            "rel_err": _rel(mean_d, mean_c), "norm": float(mean_d.norm() / mean_c.norm()),
            "backlog": float(residual.norm() / sum(computed).norm())}


def codec_table(spec: str, rounds: list[list[Flat]]) -> dict:
    """Bits a value, each client's and the mean's relative error of ``spec`` on the kept updates (no EF)."""
    codec = make_codec(spec, key="--codecs")
    channels: dict[int, Channel] = {}
    bits, values, client_err, mean_err = 0, 0, [], []
    for r, clients in enumerate(rounds):
        got_sum, want_sum = 0, 0
        for i, update in enumerate(clients):
            if i not in channels:  # the first payload carries the name table: not counted below
                channels[i] = Channel(up=codec, wire="compact", entropy="zstd")
                channels[i].send(Message(tensors=dict(update)), round_idx=0, client_id=i, direction="up")
            ch = channels[i]
            got = ch.send(Message(tensors=dict(update)), round_idx=r + 1, client_id=i, direction="up").tensors
            bits += 8 * ch.transfers[-1].num_bytes
            names = [k for k, t in update.items() if t.is_floating_point()]
            values += sum(update[k].numel() for k in names)
            want, have = _cat(update, names), _cat(got, names)
            client_err.append(_rel(have, want))
            got_sum, want_sum = got_sum + have, want_sum + want
        mean_err.append(_rel(got_sum, want_sum))
    return {"codec": spec, "bits_per_value": bits / values, "ratio": 32 * values / bits,
            "client_err": sum(client_err) / len(client_err), "mean_err": sum(mean_err) / len(mean_err)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="banking77", choices=sorted(bench.TASKS))
    parser.add_argument("--setting", default="randk0.75+sign", choices=sorted(bench.SETTINGS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", default="classifier,lora_A,lora_B", help="comma-separated name patterns")
    parser.add_argument("--codecs", default="", help="comma-separated codec specs to compare on the same updates")
    parser.add_argument("--keep-rounds", type=int, default=3, help="rounds whose updates --codecs codes")
    parser.add_argument("--out", help="also write the numbers here (JSON)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    groups = args.groups.split(",")
    per_round: dict[int, list[dict]] = defaultdict(list)
    current = {"round": -1}

    def spy(codec, tensors, residual):
        encoded, meta, new_residual = compress_with_feedback(codec, tensors, residual)
        floating = {k: t.detach().float().clone() for k, t in tensors.items() if t.is_floating_point()}
        decoded = codec.decode(dict(encoded), meta)
        per_round[current["round"]].append({"computed": floating, "decoded": decoded, "residual": new_residual})
        return encoded, meta, new_residual

    runtime.compress_with_feedback = spy  # the client runtime calls it by this name
    original_run = runtime.ClientRuntime.run

    def run_client(self, strategy, *, round_idx, client_id, message):
        current["round"] = round_idx
        return original_run(self, strategy, round_idx=round_idx, client_id=client_id, message=message)

    runtime.ClientRuntime.run = run_client
    overrides = [*bench.FRONTIER_BASE, *bench.TASKS[args.task], f"num_rounds={args.rounds}", f"seed={args.seed}",
                 *bench.SETTINGS[args.setting], "engine=sequential", *args.overrides]
    assert "comm.error_feedback=true" in overrides, "the diagnosis reads the error-feedback path"
    rows = bench.metrics(overrides)

    quality = rows[-1].get("eval/accuracy")
    say(f"{args.task} {args.setting} seed {args.seed}, {args.rounds} rounds: final "
          + (f"accuracy {100 * quality:.1f}%" if quality is not None else f"eval loss {rows[-1]['eval/loss']:.3f}"))
    table = []
    say("\n| round | group | values | agree (orthogonal) | pair cos | cos | rel err | norm | backlog |")
    say("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(per_round):
        clients = per_round[r]
        names = [k for k in clients[0]["computed"]]
        for g in [*groups, "rest"]:
            members = [k for k in names if (next((p for p in groups if p in k), "rest")) == g]
            if not members:
                continue
            row = {"round": r, "group": g, **fidelity(clients, members)}
            table.append(row)
            say(f"| {r} | {g} | {row['values']:,} | {row['agree']:.2f} ({row['clients'] ** -0.5:.2f}) | "
                  f"{row['pair_cos']:.3f} | {row['cos']:.3f} | {row['rel_err']:.3f} | {row['norm']:.3f} | "
                  f"{row['backlog']:.3f} |")
    codecs = []
    if args.codecs:
        kept = [[c["computed"] for c in per_round[r]] for r in sorted(per_round)[: args.keep_rounds]]
        say(f"\nCodecs on the computed updates of rounds 0-{len(kept) - 1} (no error feedback):\n")
        say("| codec | bits a value | vs fp32 | client rel err | rel err of the mean |")
        say("|---|---:|---:|---:|---:|")
        for spec in args.codecs.split(","):
            row = codec_table(spec, kept)
            codecs.append(row)
            cell = spec.replace("|", "\\|")  # a per-tensor spec's | inside a markdown cell
            say(f"| {cell} | {row['bits_per_value']:.3f} | {row['ratio']:.1f}x | {row['client_err']:.3f} | "
                  f"{row['mean_err']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"overrides": overrides, "rows": rows, "fidelity": table,
                                              "codecs": codecs}, indent=1))


if __name__ == "__main__":
    main()
