"""FedCyBGD (arXiv 2406.11187): cycle block gradient descent, full-parameter tuning one block at a time.

The model's parameters are split into ``num_blocks`` blocks (:mod:`fedtune.models.blocks`:
contiguous groups of decoder layers; block 0 also owns the input embeddings, the last block the
final norm and the head). Needs a peft-free model (``lora.enabled=false``).

Schedule (one client per round, as in the paper; deterministic, no sampling): round ``r`` is run by
client ``r mod num_clients`` and trains block ``r mod num_blocks``. Clients and blocks cycle
together: with as many clients as blocks each client always trains the same block; otherwise the
pairing rotates. ``clients_per_round`` is ignored (a warning says so once).

Per round, to the scheduled client only:
  down: a compressed model, ``meta = {"block": b}``:
        - block ``b``: every tensor, whole (the client trains it);
        - blocks already updated by some earlier round: every tensor, magnitude-pruned at
          ``prune_ratio`` (matrices only) and sent sparse (:mod:`fedcybgd_compress`);
        - blocks not updated yet: their decoder layers are dropped (not sent; the client's forward
          skips them); their frame tensors (the embeddings of block 0, the final norm and head of
          the last block) are still sent whole, because every forward needs them.
  up:   the block's delta ``theta_b' - theta_b`` (every tensor of block ``b``) + ``num_examples``.
Server: ``theta_b <- theta_b + delta`` on the full global model; block ``b`` is marked updated.
The client holds only the kept layers during training, and gradients and AdamW state only for its
block: that is what ``mem/client_peak_bytes`` measures.

With ``num_blocks=1`` and ``prune_ratio=0`` the download is the whole model and the upload the whole
update: full-parameter FedAvg with one client per round.

Metrics. The client trains a proxy (the kept layers only): its loss is ``train/proxy_loss``.
``train/loss`` is the task loss of the full-depth model being trained, on the same batch at every
step, as for every other strategy: every decoder layer, the client's current block, the dropped
(never updated) layers at their global values, which are still the initial weights every process
holds from ``setup``, and the other updated blocks as received (pruned at ``prune_ratio``; exactly
the global model when it is 0). It is instrumentation: a no-grad forward, not counted in FLOPs or
memory, run with the RNG state forked so it does not change training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel

from fedtune.client.runtime import ClientContext
from fedtune.comm.channel import Message
from fedtune.errors import ConfigError
from fedtune.models.blocks import BlockLayout, block_layout, find_layers_path, only_layers, set_partial_state
from fedtune.models.lora import State
from fedtune.strategies.aggregate import add_scaled
from fedtune.strategies.base import ServerContext, Strategy
from fedtune.strategies.fedcybgd_compress import decode_pruned, encode_pruned
from fedtune.tensors import structure_changed
from fedtune.train.local import Loss

log = logging.getLogger(__name__)


@contextmanager
def _layers_as(model: torch.nn.Module, layers_path: str, layers: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's decoder-layer list is ``layers``; what it was is put back on exit."""
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    current = getattr(parent, attr)
    setattr(parent, attr, layers)
    structure_changed(model)
    try:
        yield
    finally:
        setattr(parent, attr, current)
        structure_changed(model)


class FedCyBGD(Strategy):
    full_parameters = True  # the runner builds the model without LoRA for this strategy

    def __init__(self, *, num_blocks: int = 2, prune_ratio: float = 0.1) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"strategy.num_blocks={num_blocks}: must be an integer >= 1 "
                              "(at most the model's number of decoder layers)")
        if not 0 <= prune_ratio < 1:
            raise ConfigError(f"strategy.prune_ratio={prune_ratio}: must be in [0, 1) "
                              "(fraction of each updated block's weights zeroed on download; e.g. 0.1)")
        self.num_blocks = num_blocks
        self.prune_ratio = float(prune_ratio)
        self.updated: set[int] = set()
        self.next_round = 0
        self._warned = False

    def setup(self, *, initial_state: State, num_clients: int, server: ServerContext | None = None) -> None:
        super().setup(initial_state=initial_state, num_clients=num_clients, server=server)
        if (server is not None and isinstance(server.model, PeftModel)) or any("lora_" in k for k in initial_state):
            raise ConfigError("strategy=fedcybgd trains full parameters: set lora.enabled=false")
        path = find_layers_path(initial_state)
        if path is None:
            raise ConfigError("strategy=fedcybgd: the model has no decoder-layer list it knows (Llama-family "
                              "model.layers or GPT-2 transformer.h); choose such a model")
        self.layout: BlockLayout = block_layout(list(initial_state), layers_path=path, num_blocks=1)
        if self.num_blocks > self.layout.num_layers:
            raise ConfigError(f"strategy.num_blocks={self.num_blocks}: the model has {self.layout.num_layers} "
                              f"decoder layers; choose 1..{self.layout.num_layers}")
        self.layout = block_layout(list(initial_state), layers_path=path, num_blocks=self.num_blocks)
        self.initial_state = initial_state  # = the global values of every block not updated yet

    def assignment(self, round_idx: int) -> tuple[int, int]:
        """(client_id, block) of round ``round_idx``."""
        return round_idx % self.num_clients, round_idx % self.num_blocks

    def download(self, block: int) -> State:
        """The compressed model the client training ``block`` receives (see the module docstring)."""
        out: State = {}
        for b, keys in enumerate(self.layout.keys):
            for key in keys:
                if b == block:
                    out[key] = self.global_state[key]
                elif b in self.updated:
                    out.update(encode_pruned(key, self.global_state[key], self.prune_ratio))
                elif key in self.layout.frame:
                    out[key] = self.global_state[key]
        return out

    def select(self, round_idx: int, sampled: list[int]) -> list[int]:
        if len(sampled) < self.num_clients and not self._warned:
            self._warned = True
            log.warning("strategy=fedcybgd schedules one client per round itself (round r: client r mod "
                        "num_clients); clients_per_round is ignored")
        return [self.assignment(round_idx)[0]]

    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        client_id, block = self.assignment(round_idx)
        assert client_ids == [client_id], (client_ids, client_id)  # what select() chose
        return {client_id: Message(tensors=self.download(block), meta={"block": block})}

    def local_update(self, client: ClientContext, message: Message) -> Message:
        block = int(message.meta["block"])
        own = self.layout.keys[block]
        params = dict(client.model.named_parameters())
        received = decode_pruned(message.tensors, {k: p.shape for k, p in params.items()})
        set_partial_state(client.model, received)
        keep = sorted({i for k in received if (i := self.layout.layer_of(k)) is not None})
        dropped = {k: self.initial_state[k] for k in params if (i := self.layout.layer_of(k)) is not None
                   and i not in keep}
        set_partial_state(client.model, dropped)  # out of the model while it trains; for train/loss only
        full_layers = client.model.get_submodule(self.layout.layers_path)
        device = client.runtime.device

        def loss_fn(model, batch, idx):
            if not dropped:  # the proxy is the full-depth model
                loss = model(**batch).loss
                return Loss(objective=loss, task=loss.detach(), terms={"proxy_loss": loss.detach()})
            rng_devices = [device] if torch.device(device).type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices), \
                    _layers_as(model, self.layout.layers_path, full_layers):
                task = model(**batch).loss
            proxy = model(**batch).loss
            return Loss(objective=proxy, task=task, terms={"proxy_loss": proxy.detach()})

        flags = {k: p.requires_grad for k, p in params.items()}
        try:
            for key, p in params.items():
                p.requires_grad_(key in own)
                p.grad = None
            # The dropped layers are out of the model while it trains: not run, not counted as held.
            with only_layers(client.model, self.layout.layers_path, keep):
                result = client.train(loss_fn=loss_fn)
            delta = {k: params[k].detach().to("cpu", copy=True) - received[k] for k in own}
        finally:
            for key, p in params.items():
                p.requires_grad_(flags[key])
                p.grad = None
        return Message(tensors=delta, meta={"num_examples": result.num_examples})

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        client_id, block = self.assignment(round_idx)
        assert list(messages) == [client_id], (list(messages), client_id)
        delta = messages[client_id].tensors
        own = self.layout.keys[block]
        assert set(delta) == set(own), sorted(set(delta) ^ set(own))[:5]
        updated = add_scaled({k: self.global_state[k] for k in own}, delta, 1.0)
        self.global_state = {**self.global_state, **updated}
        self.updated.add(block)
        self.next_round = round_idx + 1
        return {"fedcybgd/block": block, "fedcybgd/updated_blocks": len(self.updated)}

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state, "updated_blocks": sorted(self.updated),
                "next_round": self.next_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
        self.updated = {int(b) for b in state["updated_blocks"]}
        self.next_round = int(state["next_round"])

