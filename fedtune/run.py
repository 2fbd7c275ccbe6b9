"""Build the components from the config, then THE round loop, top to bottom."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from fedtune import checkpoint
from fedtune.comm.channel import Message
from fedtune.config import build, to_container, validate
from fedtune.data.partition_report import format_report_table, partition_report, save_heatmap
from fedtune.engine.client import ClientResult
from fedtune.engine.clock import REFERENCE, client_profiles, client_time
from fedtune.engine.store import ClientStore
from fedtune.errors import ConfigError, Interrupted
from fedtune.metrics.text import perplexity
from fedtune.models.lora import count_parameters, set_trainable_state
from fedtune.models.quant import base_bytes
from fedtune.seeding import sample_clients
from fedtune.sinks import ConsoleSink, JsonlSink, Sinks, dumps
from fedtune.strategies.aggregate import all_finite
from fedtune.train.evaluate import below_majority, evaluate, majority_accuracy
from fedtune.world import build_world, client_runtime, make_channel, resolve_device

log = logging.getLogger(__name__)


def _mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1e-12)


def run(
    cfg: DictConfig,
    *,
    out_dir: str | Path,
    choices: dict[str, str] | None = None,
    group: str | None = None,
    job_name: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one experiment into ``out_dir``; returns the summary (also written to summary.json).

    With ``resume=True``, ``out_dir`` holds an earlier run of this config: it continues after that
    run's last checkpointed round, appending to its metrics.jsonl and W&B run.
    """
    validate(cfg)
    out_dir = Path(out_dir)
    with checkpoint.run_lock(out_dir):
        return _run(cfg, out_dir=out_dir, choices=choices, group=group, job_name=job_name, resume=resume)


def _run(cfg: DictConfig, *, out_dir: Path, choices: dict[str, str] | None, group: str | None,
         job_name: str | None, resume: bool) -> dict[str, Any]:
    ckpt = checkpoint.load(out_dir / "checkpoint") if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"resume={out_dir}: no checkpoint there (checkpoint/latest); start a new run instead")
    if ckpt is not None and ckpt["round_idx"] + 1 >= cfg.num_rounds:
        raise ConfigError(f"resume={out_dir}: nothing left to run (rounds done: {ckpt['round_idx'] + 1} of "
                          f"num_rounds={cfg.num_rounds}); pass num_rounds=N with N > {ckpt['round_idx'] + 1} to "
                          "extend it")
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise ConfigError(f"output_dir={out_dir}: already holds a run (metrics.jsonl); choose a new folder")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(str(cfg.device))
    wall_start = time.perf_counter()

    # ---- Build: data, tokenizer, the one resident model, shards, strategy, channel, engine, sinks.
    world = build_world(cfg, device=device)
    splits, tokenizer, task, model, shards = world.splits, world.tokenizer, world.task, world.model, world.shards
    trainable_params, total_params = count_parameters(model)
    report = partition_report(splits.train, world.parts, column=cfg.partition.get("column"),
                              label_names=splits.label_names)
    strategy = world.strategy
    channel = make_channel(cfg)
    limit = cfg.store.max_memory_mb
    store = ClientStore(max_memory_bytes=None if limit is None else int(limit * 2**20), spill_dir=out_dir / "client_store")
    runtime = client_runtime(cfg, world, store=store, channel=channel)
    schedule = strategy.schedule
    profiles = dict(enumerate(client_profiles(cfg.clients, cfg.network, num_clients=cfg.num_clients, seed=cfg.seed)))
    engine = build(cfg.engine)
    clients_per_round = cfg.clients_per_round or cfg.num_clients

    total_bytes, rejected_total, start_round, wall_before = 0, 0, 0, 0.0
    last: dict[str, Any] = {}
    choices = dict(choices or {})
    if ckpt is not None:  # exact resume: restore state, drop metrics rows logged after the checkpoint
        strategy.load_state_dict(ckpt["strategy"])
        schedule.load_state_dict(ckpt["schedule"])
        store.load_state_dict(ckpt["store"], base=out_dir / "checkpoint")
        checkpoint.set_rng_state(ckpt["rng"])
        total_bytes, rejected_total, last = ckpt["total_bytes"], ckpt["rejected_total"], ckpt["last"]
        # what the run was started with, not what `fedtune resume=...` composed; wall time so far
        choices, group = ckpt.get("choices", choices), ckpt.get("group", group)
        wall_before = float(ckpt.get("wall_s", 0.0))
        start_round = ckpt["round_idx"] + 1
        checkpoint.truncate_metrics(out_dir / "metrics.jsonl", last_round=ckpt["round_idx"])
        log.info("resuming %s after round %d", out_dir, ckpt["round_idx"])

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "partition.json").write_text(dumps(report, indent=1))
    heatmap = save_heatmap(report, out_dir / "plots" / "partition.png") if report["values"] else None
    log.info("partition (%s):\n%s", report["column"] or "sizes", format_report_table(report))
    config = to_container(cfg)
    if not resume:  # the config as it ran, next to its outputs (what `resume=` reads back)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    sinks = Sinks([JsonlSink(out_dir / "metrics.jsonl"), ConsoleSink(num_rounds=cfg.num_rounds)])
    start_info = {
        "model/trainable_params": trainable_params,
        "model/total_params": total_params,
        "model/base_bytes": base_bytes(model),
        "data/train_examples": len(splits.train),
        "data/eval_examples": len(task.eval),
        "data/truncated_train": task.train.num_truncated,
        "data/truncated_eval": task.eval.num_truncated,
        "partition/sizes": [len(shards[c]) for c in range(cfg.num_clients)],
        "data/eval_from": splits.info.get("eval_from"),  # the file (or hold-out) eval came from
    }
    majority = majority_accuracy(task)  # classification: the accuracy a model that learned nothing gets
    if majority is not None:
        start_info["eval/majority_accuracy"] = majority[0]
        log.info("eval: %d examples from %s; majority-class accuracy %.4f (always %r)", len(task.eval),
                 start_info["data/eval_from"], majority[0], majority[1])
    log.info("model: %d trainable / %d params | clients: %s examples | device %s",
             trainable_params, total_params, start_info["partition/sizes"], device)
    try:
        make_logger = build(cfg.logger, _partial_=True)
        logger_sink = make_logger(run_dir=str(out_dir), run_config=config, group=group, name=job_name,
                                  run_id=ckpt["wandb_id"] if ckpt else None)
        sinks.sinks.append(logger_sink)
        sinks.summary(start_info)
        sinks.log_media(images={"partition/heatmap": heatmap} if heatmap else {},
                        tables={"partition/clients": partition_table(report)})
        round_idx, saved_round = start_round, (ckpt["round_idx"] if ckpt else None)
        engine.start(runtime, cfg)
        for round_idx in range(start_round, cfg.num_rounds):
            round_start = time.perf_counter()
            sampled = sample_clients(
                seed=cfg.seed, round_idx=round_idx, num_clients=cfg.num_clients, clients_per_round=clients_per_round
            )
            client_ids = schedule.dispatch(seed=cfg.seed, round_idx=round_idx, num_clients=cfg.num_clients,
                                           clients_per_round=clients_per_round, sampled=sampled)
            outgoing = strategy.broadcast(round_idx, client_ids)
            down_s = [0.0]

            def receive(cid: int, msg: Message, round_idx: int = round_idx, down_s: list = down_s) -> Message:
                t0 = time.perf_counter()
                got = channel.send(msg, round_idx=round_idx, client_id=cid, direction="down")
                down_s[0] += time.perf_counter() - t0
                return got

            replies: dict[int, Message] = {}
            up = {"s": 0.0, "fold_s": 0.0, "rejected": 0}

            def deliver(cid: int, result: ClientResult, round_idx: int = round_idx,
                        replies: dict[int, Message] = replies, up: dict = up) -> None:
                """The uplink, right after each update: the server folds the reply in as it arrives."""
                t0 = time.perf_counter()
                reply = channel.send(result.message, round_idx=round_idx, client_id=cid, direction="up")
                result.message = None  # the client's copy is gone once sent
                t1 = time.perf_counter()
                up["s"] += t1 - t0  # the channel only: folding is aggregation, timed as such
                if all_finite(reply.tensors):
                    replies[cid] = strategy.fold(round_idx, cid, reply)
                else:  # a NaN/inf update would poison the global state: drop it, count it
                    up["rejected"] += 1
                    log.warning("round %d: client %d sent a non-finite update; rejected", round_idx, cid)
                up["fold_s"] += time.perf_counter() - t1

            results = engine.run_round(strategy, round_idx=round_idx, messages=outgoing, receive=receive,
                                       deliver=deliver)
            comm_s, rejected = down_s[0] + up["s"], up["rejected"]
            if results and rejected == len(results):
                log.warning("round %d: every update (%d of %d) was non-finite and rejected; the global state "
                            "is unchanged this round", round_idx, rejected, len(results))

            # The simulated clock: when each reply would arrive; the schedule picks what is aggregated now.
            sent = channel.bytes_by_client(round_idx)
            schedule.push(replies, {cid: client_time(
                profiles.get(cid, REFERENCE), flops=results[cid].report.flops if results[cid].report else 0.0,
                flops_per_s=float(cfg.clients.flops_per_s), up_bytes=sent.get((cid, "up"), 0),
                down_bytes=sent.get((cid, "down"), 0),
                round_trips=results[cid].report.round_trips if results[cid].report else 1,
                server_flops=results[cid].report.server_flops if results[cid].report else 0.0,
                server_flops_per_s=cfg.clients.get("server_flops_per_s")) for cid in replies})
            ready, sched_stats = schedule.collect()

            t = time.perf_counter()
            metrics: dict[str, Any] = strategy.aggregate(round_idx, ready) if ready else {}
            metrics.update(sched_stats)
            aggregate_s = time.perf_counter() - t + up["fold_s"]

            reports = [r.report for r in results.values() if r.report is not None]
            if reports:
                weights = [float(r.num_examples) for r in reports]
                metrics["train/loss"] = _mean([r.loss for r in reports], weights)
                for name in sorted({n for r in reports for n in r.terms}):  # e.g. train/kd_loss, train/proxy_loss
                    has = [(r.terms[name], w) for r, w in zip(reports, weights) if name in r.terms]
                    metrics[f"train/{name}"] = _mean([v for v, _ in has], [w for _, w in has])
                metrics["train/steps"] = sum(r.num_steps for r in reports)
                metrics["train/tokens"] = sum(r.num_tokens for r in reports)
                metrics["train/client_flops"] = sum(r.flops for r in reports)
                metrics["mem/client_peak_bytes"] = max(r.mem_bytes for r in reports)
                metrics["time/server_compute_s"] = sum(r.server_seconds for r in reports)

            t = time.perf_counter()
            last_round = round_idx == cfg.num_rounds - 1
            if last_round or (cfg.eval.every and (round_idx + 1) % cfg.eval.every == 0):
                metrics.update(_evaluate(cfg, strategy.eval_states(store), model, tokenizer, task, device))
            eval_s = time.perf_counter() - t

            by = channel.bytes_by(round_idx)
            total_bytes += by["up"] + by["down"]
            rejected_total += rejected
            metrics.update({
                "comm/up_bytes": by["up"], "comm/down_bytes": by["down"], "comm/total_bytes": total_bytes,
                **{f"comm/{k}_bytes": v for k, v in by.items() if "/" in k},
                "comm/rejected_updates": rejected, "clients/participants": len(results),
                "time/client_compute_s": sum(r.seconds for r in results.values()),
                "time/comm_s": comm_s, "time/aggregate_s": aggregate_s, "time/eval_s": eval_s,
                "time/round_s": time.perf_counter() - round_start,
                "mem/process_rss_bytes": psutil.Process().memory_info().rss,
            })
            sinks.log(metrics, step=round_idx)
            last = metrics
            if cfg.checkpoint.every and ((round_idx + 1) % cfg.checkpoint.every == 0 or round_idx == cfg.num_rounds - 1):
                checkpoint.save(out_dir / "checkpoint", round_idx, {
                    "strategy": strategy.state_dict(), "schedule": schedule.state_dict(),
                    "rng": checkpoint.rng_state(),
                    "total_bytes": total_bytes, "rejected_total": rejected_total, "last": last,
                    "wandb_id": getattr(logger_sink, "run_id", None), "choices": choices, "group": group,
                    "wall_s": wall_before + time.perf_counter() - wall_start,
                }, keep_last=cfg.checkpoint.keep_last, store=store)
                saved_round = round_idx

        _save_adapters(model, strategy.eval_states(store), out_dir / "adapter")
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        summary = {
            "comm/up_bytes_total": sum(r["comm/up_bytes"] for r in rows),
            "comm/down_bytes_total": sum(r["comm/down_bytes"] for r in rows),
            "final": {k: v for k, v in last.items() if k.startswith(("eval/", "train/"))},
            "comm/total_bytes": total_bytes,
            "comm/rejected_updates": rejected_total,
            # the whole run's wall time: every session's, up to its last checkpoint, plus this one's
            "time/wall_s": wall_before + time.perf_counter() - wall_start,
            "choices": choices,
            "wandb/group": group,
            **start_info,
        }
        sinks.summary({k: v for k, v in summary.items() if k not in ("final", "choices")})
        (out_dir / "summary.json").write_text(dumps(summary, indent=2, sort_keys=True))
        if warning := below_majority(last, majority):
            log.warning(warning)
        return summary
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(round_idx, saved_round, cfg.num_rounds, out_dir)) from None
    finally:
        engine.close()
        sinks.close()


def interrupted_message(round_idx: int, saved_round: int | None, num_rounds: int, out_dir: Path) -> str:
    """What Ctrl-C stopped and how to go on (rounds 1-based, as the console counts them)."""
    where = f"interrupted during round {round_idx + 1}/{num_rounds}"
    if saved_round is None:
        return f"{where}; no round was checkpointed, so there is nothing to resume: start the run again"
    return (f"{where}; the last complete round is {saved_round + 1} (checkpointed); "
            f"continue with `fedtune resume={out_dir}`")


def partition_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The partition as (columns, rows): one row per client, its size and per-value counts."""
    names = [str(n) for n in report["value_names"]]
    rows = [[cid, report["counts"][cid], *report["histograms"][cid]] for cid in range(report["num_clients"])]
    return ["client", "examples", *names], rows


def _evaluate(cfg, states, model, tokenizer, task, device) -> dict[str, float]:
    """Evaluate each named state; several (local baseline) -> per-name metrics and their mean."""
    per_name = {}
    for name, state in states.items():
        set_trainable_state(model, state)
        per_name[name] = evaluate(
            task, model, tokenizer, batch_size=cfg.eval.batch_size,
            bleu_samples=cfg.eval.bleu_samples, max_new_tokens=cfg.eval.max_new_tokens, device=device,
        )
    out: dict[str, float] = {}
    for key in next(iter(per_name.values())):
        out[f"eval/{key}"] = sum(m[key] for m in per_name.values()) / len(per_name)
        if len(per_name) > 1:
            out.update({f"eval/{name}/{key}": m[key] for name, m in per_name.items()})
    if "eval/ppl" in out:
        # Every state is scored on the same eval tokens, so the token-weighted mean loss over all of
        # them is the plain mean, and perplexity is exp of it: the same definition as a single state's
        # (not a mean of per-client perplexities, which exp's convexity inflates).
        out["eval/ppl"] = perplexity(out["eval/loss"])
    return out


def _save_adapters(model: torch.nn.Module, states: Mapping[str, Any], folder: Path) -> None:
    """The final trainable state(s) via ``save_pretrained`` (peft adapter, or the full model)."""
    for name, state in states.items():
        set_trainable_state(model, state)
        target = folder if len(states) == 1 else folder / name
        kwargs = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        model.save_pretrained(str(target), **kwargs)
