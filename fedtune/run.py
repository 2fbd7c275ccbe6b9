"""Build the components from the config, then THE round loop, top to bottom.

One round: sample -> strategy.select -> schedule.dispatch -> strategy.broadcast -> per client (as the engine
finishes it): channel down, local update, channel up, finite check, strategy.fold -> the simulated
clock -> schedule.collect -> strategy.aggregate -> train metrics -> eval -> bytes and times -> sinks ->
checkpoint. Everything else (restore, run files, the logger, the summary) is a small function below.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from fedtune import checkpoint
from fedtune.client.runtime import ClientResult
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Channel, Message
from fedtune.config import build, to_container, validate
from fedtune.data.partition_report import Drawing, draw_heatmap, format_report_table, partition_report
from fedtune.errors import ConfigError, Interrupted
from fedtune.metrics.text import perplexity
from fedtune.models.lora import count_parameters, set_trainable_state
from fedtune.models.quant import base_bytes
from fedtune.seeding import sample_clients
from fedtune.sim.clock import REFERENCE, ClientProfile, client_profiles, client_time
from fedtune.sim.schedule import Schedule
from fedtune.sinks import ConsoleSink, JsonlSink, Sinks, dumps
from fedtune.strategies.aggregate import all_finite
from fedtune.strategies.base import Strategy
from fedtune.train.evaluate import below_majority, evaluate, majority_accuracy
from fedtune.world import World, build_world, client_runtime, make_channel, resolve_device

log = logging.getLogger(__name__)


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


@dataclass
class Progress:
    """What carries from round to round and into the checkpoint (restored from it on resume)."""

    choices: dict[str, str]
    group: str | None
    next_round: int = 0
    total_bytes: int = 0
    rejected_total: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    wall_before: float = 0.0  # the wall time of earlier sessions of this run (resume)
    saved_round: int | None = None  # the last checkpointed round
    wandb_id: str | None = None


def _run(cfg: DictConfig, *, out_dir: Path, choices: dict[str, str] | None, group: str | None,
         job_name: str | None, resume: bool) -> dict[str, Any]:
    ckpt = _checkpoint_to_resume(cfg, out_dir) if resume else None
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise ConfigError(f"output_dir={out_dir}: already holds a run (metrics.jsonl); choose a new folder")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(str(cfg.device))
    wall_start = time.perf_counter()

    # ---- Build: data, tokenizer, the one resident model, shards, strategy, channel, store, schedule, engine.
    world = build_world(cfg, device=device)
    strategy, model, task = world.strategy, world.model, world.task
    channel = make_channel(cfg)
    limit = cfg.store.max_memory_mb
    store = ClientStore(max_memory_bytes=None if limit is None else int(limit * 2**20), spill_dir=out_dir / "client_store")
    runtime = client_runtime(cfg, world, store=store, channel=channel)
    schedule: Schedule = build(cfg.schedule)
    profiles = dict(enumerate(client_profiles(cfg.clients, cfg.network, num_clients=cfg.num_clients, seed=cfg.seed)))
    engine = build(cfg.engine)
    clients_per_round = cfg.clients_per_round or cfg.num_clients
    progress = Progress(choices=dict(choices or {}), group=group)
    if ckpt is not None:
        _restore(ckpt, progress, strategy=strategy, schedule=schedule, store=store, channel=channel, out_dir=out_dir)
    sinks, start_info, majority, media = _open_run_files(cfg, world, out_dir, resume=resume)
    heatmap = media[0]  # drawn by a child process while the rounds run; logged once it is there
    try:
        _attach_logger(cfg, sinks, progress, out_dir, job_name=job_name, start_info=start_info, media=media)
        engine.start(runtime, cfg, strategy)
        round_idx = progress.next_round
        for round_idx in range(progress.next_round, cfg.num_rounds):
            round_start = time.perf_counter()
            sampled = strategy.select(round_idx, sample_clients(
                seed=cfg.seed, round_idx=round_idx, num_clients=cfg.num_clients, clients_per_round=clients_per_round))
            client_ids = schedule.dispatch(seed=cfg.seed, round_idx=round_idx, num_clients=cfg.num_clients,
                                           clients_per_round=clients_per_round, sampled=sampled)

            # Down, update, up, fold: one client at a time (the engine pulls each download when it starts
            # that client); each reply is sent up and folded in as soon as its update is done.
            outgoing = strategy.broadcast(round_idx, client_ids)
            downloads = ((cid, channel.send(msg, round_idx=round_idx, client_id=cid, direction="down"))
                         for cid, msg in outgoing.items())
            results: dict[int, ClientResult] = {}
            replies: dict[int, Message] = {}
            rejected, fold_s = 0, 0.0
            for cid, result in engine.run_round(strategy, round_idx=round_idx, downloads=downloads):
                results[cid] = result
                reply = channel.send(result.take_message(), round_idx=round_idx, client_id=cid, direction="up")
                t = time.perf_counter()
                if all_finite(reply.tensors):
                    replies[cid] = strategy.fold(round_idx, cid, reply)
                else:  # a NaN/inf update would poison the global state: drop it, count it
                    rejected += 1
                    log.warning("round %d: client %d sent a non-finite update; rejected", round_idx, cid)
                fold_s += time.perf_counter() - t  # folding is aggregation, timed as such
            if results and rejected == len(results):
                log.warning("round %d: every update (%d of %d) was non-finite and rejected; the global state "
                            "is unchanged this round", round_idx, rejected, len(results))

            # The simulated clock: when each reply would arrive; the schedule picks what is aggregated now.
            schedule.push(replies, arrival_delays(cfg, profiles, channel.bytes_by_client(round_idx), results, replies))
            ready, schedule_metrics = schedule.collect()
            t = time.perf_counter()
            metrics: dict[str, Any] = strategy.aggregate(round_idx, ready) if ready else {}
            metrics.update(schedule_metrics)
            aggregate_s = time.perf_counter() - t + fold_s
            metrics.update(train_metrics(results))

            t = time.perf_counter()
            if round_idx == cfg.num_rounds - 1 or (cfg.eval.every and (round_idx + 1) % cfg.eval.every == 0):
                metrics.update(_evaluate(cfg, strategy.eval_states(store), model, world.tokenizer, task, device))
            eval_s = time.perf_counter() - t

            by = channel.bytes_by(round_idx)
            progress.total_bytes += by["up"] + by["down"]
            progress.rejected_total += rejected
            metrics.update({
                "comm/up_bytes": by["up"], "comm/down_bytes": by["down"], "comm/total_bytes": progress.total_bytes,
                **{f"comm/{k}_bytes": v for k, v in by.items() if "/" in k},
                "comm/rejected_updates": rejected, "clients/participants": len(results),
                "time/client_compute_s": sum(r.seconds for r in results.values()),
                "time/comm_s": channel.seconds(round_idx), "time/aggregate_s": aggregate_s, "time/eval_s": eval_s,
                "time/round_s": time.perf_counter() - round_start,
                "mem/process_rss_bytes": psutil.Process().memory_info().rss,
            })
            heatmap = _log_heatmap(sinks, heatmap, wait=round_idx == cfg.num_rounds - 1)
            sinks.log(metrics, step=round_idx)
            progress.last = metrics
            if cfg.checkpoint.every and ((round_idx + 1) % cfg.checkpoint.every == 0 or round_idx == cfg.num_rounds - 1):
                _save_checkpoint(cfg, out_dir, round_idx, progress, strategy=strategy, schedule=schedule, store=store,
                                 channel=channel, wall_s=progress.wall_before + time.perf_counter() - wall_start)

        _save_adapters(model, strategy.eval_states(store), out_dir / "adapter")
        summary = _write_summary(cfg, out_dir, progress, start_info, strategy=strategy, sinks=sinks,
                                 wall_s=progress.wall_before + time.perf_counter() - wall_start)
        if warning := below_majority(progress.last, majority):
            log.warning(warning)
        return summary
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(round_idx, progress.saved_round, cfg.num_rounds, out_dir)) from None
    finally:
        engine.close()
        if heatmap is not None:
            heatmap.wait()  # the file is complete whenever run() returns
        sinks.close()


# ---- the pieces of a run, in the order it uses them

def _checkpoint_to_resume(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The checkpoint ``resume=`` continues from; ConfigError when there is none or nothing is left to run."""
    ckpt = checkpoint.load(out_dir / "checkpoint")
    if ckpt is None:
        raise ConfigError(f"resume={out_dir}: no checkpoint there (checkpoint/latest); start a new run instead")
    if ckpt["round_idx"] + 1 >= cfg.num_rounds:
        raise ConfigError(f"resume={out_dir}: nothing left to run (rounds done: {ckpt['round_idx'] + 1} of "
                          f"num_rounds={cfg.num_rounds}); pass num_rounds=N with N > {ckpt['round_idx'] + 1} to "
                          "extend it")
    return ckpt


def _restore(ckpt: dict[str, Any], progress: Progress, *, strategy: Strategy, schedule: Schedule,
             store: ClientStore, channel: Channel, out_dir: Path) -> None:
    """Exact resume: every state the rounds change, and metrics rows logged after the checkpoint dropped."""
    strategy.load_state_dict(ckpt["strategy"])
    schedule.load_state_dict(ckpt["schedule"])
    store.load_state_dict(ckpt["store"], base=out_dir / "checkpoint")
    channel.load_state_dict(ckpt.get("channel", {"tables": []}))  # the compact wire's string tables
    checkpoint.set_rng_state(ckpt["rng"])
    progress.total_bytes, progress.rejected_total, progress.last = ckpt["total_bytes"], ckpt["rejected_total"], ckpt["last"]
    # what the run was started with, not what `fedtune resume=...` composed; wall time so far
    progress.choices, progress.group = ckpt.get("choices", progress.choices), ckpt.get("group", progress.group)
    progress.wall_before = float(ckpt.get("wall_s", 0.0))
    progress.next_round, progress.saved_round = ckpt["round_idx"] + 1, ckpt["round_idx"]
    progress.wandb_id = ckpt["wandb_id"]
    checkpoint.truncate_metrics(out_dir / "metrics.jsonl", last_round=ckpt["round_idx"])
    log.info("resuming %s after round %d", out_dir, ckpt["round_idx"])


Media = tuple[Drawing | None, dict[str, tuple[list[str], list[list[Any]]]]]  # (the heatmap being drawn, tables)


def _open_run_files(cfg: DictConfig, world: World, out_dir: Path, *, resume: bool
                    ) -> tuple[Sinks, dict[str, Any], tuple[float, str] | None, Media]:
    """The run folder's first files (partition, config) and the sinks; returns them with the start info
    (model size, data, partition), the majority-class accuracy (classification) and the partition's media."""
    task, splits, shards = world.task, world.splits, world.shards
    report = partition_report(splits.train, world.parts, column=cfg.partition.get("column"),
                              label_names=splits.label_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "partition.json").write_text(dumps(report, indent=1))
    heatmap = draw_heatmap(report, out_dir / "plots" / "partition.png") if report["values"] else None
    log.info("partition (%s):\n%s", report["column"] or "sizes", format_report_table(report))
    if not resume:  # the config as it ran, next to its outputs (what `resume=` reads back)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    sinks = Sinks([JsonlSink(out_dir / "metrics.jsonl"), ConsoleSink(num_rounds=cfg.num_rounds)])
    trainable_params, total_params = count_parameters(world.model)
    start_info = {
        "model/trainable_params": trainable_params,
        "model/total_params": total_params,
        "model/base_bytes": base_bytes(world.model),
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
             trainable_params, total_params, start_info["partition/sizes"], world.device)
    media: Media = (heatmap, {"partition/clients": partition_table(report)})
    return sinks, start_info, majority, media


def _attach_logger(cfg: DictConfig, sinks: Sinks, progress: Progress, out_dir: Path, *,
                   job_name: str | None, start_info: dict[str, Any], media: Media) -> None:
    """The configured logger (W&B or none) joins the sinks; the start info and partition go to it."""
    make_logger = build(cfg.logger, _partial_=True)
    logger_sink = make_logger(run_dir=str(out_dir), run_config=to_container(cfg), group=progress.group,
                              name=job_name, run_id=progress.wandb_id)
    sinks.sinks.append(logger_sink)
    progress.wandb_id = getattr(logger_sink, "run_id", None)
    sinks.summary(start_info)
    sinks.log_media(images={}, tables=media[1])


def _log_heatmap(sinks: Sinks, heatmap: Drawing | None, *, wait: bool) -> Drawing | None:
    """The partition heatmap joins the logged media (with the next row) once its child process has
    drawn it, at the latest with the last round's row; returns what is still pending."""
    if heatmap is None or not (wait or heatmap.ready()):
        return heatmap
    if (path := heatmap.wait()) is not None:
        sinks.log_media(images={"partition/heatmap": path}, tables={})
    return None


def arrival_delays(cfg: DictConfig, profiles: dict[int, ClientProfile], sent: dict[tuple[int, str], int],
                   results: dict[int, ClientResult], replies: dict[int, Message]) -> dict[int, float]:
    """Simulated seconds from dispatch to each reply's arrival (the clock: compute + traffic + latency)."""
    out = {}
    for cid in replies:
        report = results[cid].report
        out[cid] = client_time(
            profiles.get(cid, REFERENCE), flops=report.flops if report else 0.0,
            flops_per_s=float(cfg.clients.flops_per_s), up_bytes=sent.get((cid, "up"), 0),
            down_bytes=sent.get((cid, "down"), 0), round_trips=report.round_trips if report else 1,
            server_flops=report.server_flops if report else 0.0,
            server_flops_per_s=cfg.clients.get("server_flops_per_s"))
    return out


def train_metrics(results: dict[int, ClientResult]) -> dict[str, Any]:
    """The round's training numbers over the updates that ran: example-weighted means of the losses
    (``train/loss`` the task loss; a strategy's extra terms as ``train/<term>``), sums of work."""
    reports = [r.report for r in results.values() if r.report is not None]
    if not reports:
        return {}
    weights = [float(r.num_examples) for r in reports]
    out: dict[str, Any] = {"train/loss": _mean([r.loss for r in reports], weights)}
    for name in sorted({n for r in reports for n in r.terms}):  # e.g. train/kd_loss, train/proxy_loss
        has = [(r.terms[name], w) for r, w in zip(reports, weights) if name in r.terms]
        out[f"train/{name}"] = _mean([v for v, _ in has], [w for _, w in has])
    out["train/steps"] = sum(r.num_steps for r in reports)
    out["train/tokens"] = sum(r.num_tokens for r in reports)
    out["train/client_flops"] = sum(r.flops for r in reports)
    out["mem/client_peak_bytes"] = max(r.mem_bytes for r in reports)
    out["time/server_compute_s"] = sum(r.server_seconds for r in reports)
    return out


def _mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1e-12)


def _save_checkpoint(cfg: DictConfig, out_dir: Path, round_idx: int, progress: Progress, *, strategy: Strategy,
                     schedule: Schedule, store: ClientStore, channel: Channel, wall_s: float) -> None:
    try:
        checkpoint.save(out_dir / "checkpoint", round_idx, {
            "strategy": strategy.state_dict(), "schedule": schedule.state_dict(), "rng": checkpoint.rng_state(),
            "channel": channel.state_dict(),
            "total_bytes": progress.total_bytes, "rejected_total": progress.rejected_total, "last": progress.last,
            "wandb_id": progress.wandb_id, "choices": progress.choices, "group": progress.group, "wall_s": wall_s,
        }, keep_last=cfg.checkpoint.keep_last, store=store)
    finally:  # Ctrl-C while old checkpoints are pruned: this one is written, and resume can use it
        if checkpoint.latest_round(out_dir / "checkpoint") == round_idx:
            progress.saved_round = round_idx


def arm(cfg: DictConfig, strategy: Strategy, choices: dict[str, str]) -> dict[str, Any]:
    """What the report groups runs by: the strategy, and whether every parameter was trained."""
    name = choices.get("strategy") or type(strategy).__name__.lower()
    full = bool(strategy.full_parameters or not cfg.lora.enabled)
    return {"name": f"{name}-full" if full and not strategy.full_parameters else name, "strategy": name,
            "full_parameters": full}


def _write_summary(cfg: DictConfig, out_dir: Path, progress: Progress, start_info: dict[str, Any], *,
                   strategy: Strategy, sinks: Sinks, wall_s: float) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "comm/up_bytes_total": sum(r["comm/up_bytes"] for r in rows),
        "comm/down_bytes_total": sum(r["comm/down_bytes"] for r in rows),
        "final": {k: v for k, v in progress.last.items() if k.startswith(("eval/", "train/"))},
        "comm/total_bytes": progress.total_bytes,
        "comm/rejected_updates": progress.rejected_total,
        # the whole run's wall time: every session's, up to its last checkpoint, plus this one's
        "time/wall_s": wall_s,
        "choices": progress.choices,
        "arm": arm(cfg, strategy, progress.choices),
        "wandb/group": progress.group,
        **start_info,
    }
    sinks.summary({k: v for k, v in summary.items() if k not in ("final", "choices", "arm")})
    (out_dir / "summary.json").write_text(dumps(summary, indent=2, sort_keys=True))
    return summary


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
        # save_pretrained is a transformers/peft method; nn.Module types unknown attributes as Tensor | Module
        model.save_pretrained(str(target), **kwargs)  # type: ignore[operator]
