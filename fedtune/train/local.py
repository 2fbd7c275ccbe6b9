"""Client-side local training: AdamW, gradient clipping, a fixed number of steps or epochs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from fedtune.data.format import Tokenized, collate
from fedtune.tensors import module_parameters, nbytes, structure_cache

# train() methods that only set the mode (transformers' re-applies kernels on a change of mode only)
_PLAIN_TRAIN = (torch.nn.Module.train, PreTrainedModel.train)


@dataclass
class Loss:
    """What a custom loss function returns when its objective is not the plain task loss.

    ``objective`` is back-propagated; ``task`` is the plain LM / classification loss of the model being
    trained on the client's own batch (what ``train/loss`` reports for every strategy, so strategies
    compare on the same quantity); ``terms`` are any other terms, reported as ``train/<name>``.
    """

    objective: torch.Tensor
    task: torch.Tensor | float
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)


# (model, batch, the batch's row indices into the data) -> scalar loss (the task loss itself), or a Loss
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], list[int]], torch.Tensor | Loss]


@dataclass
class TrainResult:
    """What one local update did (instrumentation: never sent over the channel)."""

    loss: float  # mean task loss over the steps (the plain LM / classification loss; see Loss)
    num_examples: int
    num_steps: int
    num_tokens: int
    seconds: float
    flops: float = 0.0  # client FLOPs estimate: 6 x (params a token passes through) x tokens, every pass
    mem_bytes: int = 0  # bytes the client held: parameters + gradients + optimizer state (measured tensors)
    server_seconds: float = 0.0  # server compute during the update (split learning)
    terms: dict[str, float] = field(default_factory=dict)  # mean of each extra loss term (train/<name>)
    round_trips: int = 1  # network round trips of the update: 1 = download, then upload (split: + 1 per step)
    server_flops: float = 0.0  # FLOPs the server runs while the client waits (split learning's server half)


def plan_steps(num_examples: int, *, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of one local update: ``max_steps`` if set, else ``epochs`` over the shard."""
    if max_steps is not None:
        return int(max_steps)
    return max(1, math.ceil(epochs * math.ceil(num_examples / batch_size)))


def batch_order(
    indices: list[int], *, batch_size: int, num_steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``num_steps`` batches: a fresh seeded shuffle per pass over ``indices``, last batch may be short."""
    produced = 0
    while produced < num_steps:
        perm = torch.randperm(len(indices), generator=generator).tolist()
        for start in range(0, len(perm), batch_size):
            yield [indices[j] for j in perm[start : start + batch_size]]
            produced += 1
            if produced == num_steps:
                return


def default_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], idx: list[int] | None = None) -> torch.Tensor:
    """Mean next-token loss over unmasked (response) tokens, as computed by the HF model."""
    return model(**batch).loss


def train_local(
    model: torch.nn.Module,
    data: Tokenized,
    indices: list[int],
    *,
    num_steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float | None,
    generator: torch.Generator,
    pad_id: int,
    device: torch.device,
    loss_fn: LossFn | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train the model's trainable parameters in place on ``data[indices]``.

    Returns the result and the optimizer's state (callers that keep optimizer state across rounds,
    e.g. the local baseline, pass it back in as ``optimizer_state``).
    """
    loss_fn = loss_fn or default_loss
    params = [p for p in module_parameters(model) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    train_mode(model)
    start = time.perf_counter()
    total_loss, tokens, steps = 0.0, 0, 0
    term_sums: dict[str, float] = {}
    for batch_idx in batch_order(indices, batch_size=batch_size, num_steps=num_steps, generator=generator):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(data, batch_idx, pad_id=pad_id).items()}
        out = loss_fn(model, batch, batch_idx)
        loss, task, terms = (out.objective, out.task, out.terms) if isinstance(out, Loss) else (out, out, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        # .item() is a CPU-GPU sync point; one per step is cheap next to the step itself.
        total_loss += _item(task)
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + _item(value)
        tokens += int(batch["attention_mask"].sum())
        steps += 1
    result = TrainResult(
        loss=total_loss / max(steps, 1),
        terms={name: value / max(steps, 1) for name, value in term_sums.items()},
        num_examples=len(indices),
        num_steps=steps,
        num_tokens=tokens,
        seconds=time.perf_counter() - start,
        flops=6.0 * compute_params(model) * tokens,
        mem_bytes=held_bytes(model, optimizer),
    )
    return result, optimizer.state_dict()


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, skipped when every submodule is already in training mode and none overrides
    ``train`` (peft's DoRA layers clear a cache there): the walk costs ~0.3 ms a client update."""
    cache = structure_cache(model)
    if "modules" not in cache:
        cache["modules"] = list(model.modules())
        cache["plain_train"] = all(type(m).train in _PLAIN_TRAIN for m in cache["modules"])
    if not (cache["plain_train"] and all(m.training for m in cache["modules"])):
        model.train()


def _item(value: torch.Tensor | float) -> float:
    return value.detach().item() if torch.is_tensor(value) else float(value)


def compute_params(model: torch.nn.Module) -> int:
    """Parameters a token passes through, each counted once.

    Embedding tables are lookups, not matmuls, and are skipped, unless the same tensor is also a
    ``Linear`` weight: a tied LM head (``lm_head.weight is embed_tokens.weight``) is a vocab x hidden
    matmul for every token. peft's frozen ``original_module`` copies behind ``modules_to_save`` are not
    run (the trainable copy is), so they are not counted. Counted once per model structure
    (:func:`~fedtune.tensors.structure_cache`).
    """
    cache = structure_cache(model)
    if "compute_params" not in cache:
        cache["compute_params"] = _count_compute_params(model)
    return int(cache["compute_params"])


def _count_compute_params(model: torch.nn.Module) -> int:
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - linear
    frozen_copies = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if ".original_module." in n}
    skipped = lookups | frozen_copies
    return sum(p.numel() for p in model.parameters() if id(p) not in skipped)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the parameters, their gradients and the optimizer state the client holds (tensors measured)."""
    total = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in module_parameters(model))
    if optimizer is not None:
        total += sum(nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return total
