"""Split-FedLLM (split learning; framework comparison arXiv 2501.04436), SplitFed style.

The model is cut at decoder layer ``split_layer`` = k: the client holds the embeddings and layers
[0, k) with their LoRA adapters; the server holds layers [k, n), the norm and the head with theirs.

What crosses the wire, per round, per participating client:
  down (once): the global client-side adapter.
  per local step: up the activations at the cut (batch x seq x hidden) + attention mask + labels;
                  down the gradient of the loss w.r.t. those activations (+ the loss value).
  up (once): the client's trained client-side adapter + ``num_examples``.
Server: the client-side adapters are FedAvg-ed each round. The server-side adapters are ONE model
trained sequentially by every client's batches, in the order the clients run (SplitFed-v2 style: a
single server model, no server-side averaging), with one AdamW state kept across rounds.

Tied embeddings (``lm_head.weight is embed_tokens.weight``, trained: e.g. SmolLM2 with
``lora.enabled=false``). The one tensor is both the client's embedding table and the server's head.
The CLIENT owns it: it is part of the client half's state (named ``...embed_tokens.weight``, FedAvg-ed
with the rest of it) and the client's optimizer updates it, once per step, with the sum of both
contributions, exactly as the whole model's optimizer would:
  up, every step, with the activations: ``head_weight``, the client's current value of the tensor
      (vocab x hidden); the server runs the head with this copy;
  down, every step, with the cut gradient: ``head_grad``, the gradient of the loss w.r.t. that copy
      (the head's contribution, vocab x hidden);
  client: back-propagates the cut gradient (the embedding's contribution lands on the tensor), adds
      ``head_grad``, clips and steps. The server never updates the tensor; it uses what it was sent.
This is exact (tested against whole-model training) and costs 2 x vocab x hidden values on the wire
per step; untying the head (a server-side copy) would be cheaper but is a different model.

Gradient clipping (``local.grad_clip``) is per side: each half clips its own gradients' norm (a
global norm would need one more exchange per step). With ``grad_clip=null`` a split update is the
same AdamW trajectory as training the whole model on the same batches (tested).

The simulated clock charges one round trip per local step on top of the download/upload
(``TrainResult.round_trips``) and the server's half of every step (``TrainResult.server_flops``:
6 x the server's parameters x tokens), because the client waits for both.

Because the server computes during every local update, this strategy's updates run where the server
is (``server_in_the_loop``): the parallel engine runs them in the server process.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedtune.client.runtime import ClientContext
from fedtune.comm.channel import Message
from fedtune.data.format import collate
from fedtune.errors import ConfigError
from fedtune.models.lora import State, get_trainable_state, set_trainable_state
from fedtune.models.split import client_forward, num_layers, on_client, server_forward, tied_head
from fedtune.seeding import Purpose, generator
from fedtune.strategies.aggregate import weighted_sum
from fedtune.strategies.base import ServerContext, Strategy, check_weighting
from fedtune.tensors import nbytes
from fedtune.train.local import TrainResult, batch_order, compute_params, plan_steps


class Split(Strategy):
    server_in_the_loop = True

    def __init__(self, *, split_layer: int = 1, weighting: str = "examples") -> None:
        self.split_layer = int(split_layer)
        self.weighting = check_weighting(weighting)
        self.server_state: State = {}
        self.server_optimizer: dict[str, Any] | None = None

    def setup(self, *, initial_state: State, num_clients: int, server: ServerContext | None = None) -> None:
        n = num_layers(server.model) if server is not None else None
        if n is not None and not 1 <= self.split_layer <= n - 1:
            raise ConfigError(f"strategy.split_layer={self.split_layer}: must be between 1 and {n - 1} "
                              f"(the model has {n} decoder layers)")
        client = {k: v for k, v in initial_state.items() if on_client(k, self.split_layer)}
        super().setup(initial_state=client, num_clients=num_clients, server=server)
        self.server_state = {k: v for k, v in initial_state.items() if not on_client(k, self.split_layer)}

    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        return {cid: Message(tensors=self.global_state) for cid in client_ids}

    def local_update(self, client: ClientContext, message: Message) -> Message:
        rt, k, server = client.runtime, self.split_layer, self.server
        assert server is not None, "split learning needs the server: setup(server=...)"
        model = client.model
        set_trainable_state(model, {**message.tensors, **self.server_state})
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        client_params = [p for n, p in named if on_client(n, k)]
        server_params = [p for n, p in named if not on_client(n, k)]
        client_opt = torch.optim.AdamW(client_params, lr=rt.local.lr, weight_decay=rt.local.weight_decay)
        server_opt = server.optimizer(server_params, self.server_optimizer)  # one AdamW state across rounds
        steps = plan_steps(len(client.indices), batch_size=rt.local.batch_size, epochs=rt.local.epochs,
                           max_steps=rt.local.max_steps)
        gen = generator(rt.seed, client.round_idx, client.client_id, Purpose.TRAIN)
        tied = tied_head(model)  # client-owned; see the module docstring
        model.train()
        client_s = server_s = loss_sum = 0.0
        tokens = num_steps = 0
        for idx in batch_order(client.indices, batch_size=rt.local.batch_size, num_steps=steps, generator=gen):
            batch = {key: v.to(rt.device) for key, v in collate(rt.data, idx, pad_id=rt.pad_id).items()}
            t = time.perf_counter()
            acts = client_forward(model, batch["input_ids"], batch["attention_mask"], k)
            sent = {"activations": acts, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
            if tied is not None:
                sent["head_weight"] = tied
            up = client.channel.send(Message(tensors=sent), round_idx=client.round_idx, client_id=client.client_id,
                                     direction="up", kind="activations")
            client_s += time.perf_counter() - t

            t = time.perf_counter()  # ---- server: its half, the loss, its update, the cut gradient
            received = up.tensors["activations"].to(rt.device).requires_grad_(True)
            head = up.tensors["head_weight"].to(rt.device).requires_grad_(True) if tied is not None else None
            loss = server_forward(model, received, up.tensors["attention_mask"].to(rt.device),
                                  up.tensors["labels"].to(rt.device), k, head_weight=head)
            server.step(server_opt, loss, server_params)
            assert received.grad is not None  # server.step ran loss.backward() through the received tensor
            back = {"grad": received.grad}
            if head is not None:
                assert head.grad is not None  # the LM head ran with it (server_forward's head_weight)
                back["head_grad"] = head.grad
            down = client.channel.send(Message(tensors=back, meta={"loss": loss.item()}), round_idx=client.round_idx,
                                       client_id=client.client_id, direction="down", kind="gradients")
            server_s += time.perf_counter() - t

            t = time.perf_counter()
            client_opt.zero_grad(set_to_none=True)
            acts.backward(down.tensors["grad"].to(rt.device))
            if tied is not None:  # the head's contribution joins the embedding's: one update per step
                head_grad = down.tensors["head_grad"].to(rt.device)
                tied.grad = head_grad if tied.grad is None else tied.grad + head_grad
            if rt.local.grad_clip:
                torch.nn.utils.clip_grad_norm_(client_params, rt.local.grad_clip)
            client_opt.step()
            client_s += time.perf_counter() - t
            loss_sum += down.meta["loss"]
            tokens += int(batch["attention_mask"].sum())
            num_steps += 1

        # The server half's state stays on the server, updated by every client in turn.
        state = get_trainable_state(model)
        self.server_state = {key: v for key, v in state.items() if not on_client(key, k)}
        self.server_optimizer = server_opt.state_dict()
        client_state = {key: v for key, v in state.items() if on_client(key, k)}
        on_device = [p for n, p in model.named_parameters() if on_client(n, k) or "embed_tokens" in n]
        held = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in on_device)
        held += sum(nbytes(v) for st in client_opt.state.values() for v in st.values() if torch.is_tensor(v))
        # FLOPs: the client runs its layers (embedding lookups are not matmuls; a tied head's matmul is
        # the server's); the server runs everything else a token passes through.
        client_compute = sum(p.numel() for n, p in model.named_parameters()
                             if on_client(n, k) and "embed_tokens" not in n)
        server_compute = compute_params(model) - client_compute
        client.report = TrainResult(
            loss=loss_sum / max(num_steps, 1), num_examples=len(client.indices), num_steps=num_steps,
            num_tokens=tokens, seconds=client_s, flops=6.0 * client_compute * tokens, mem_bytes=held,
            server_seconds=server_s, round_trips=num_steps + 1, server_flops=6.0 * server_compute * tokens,
        )
        return Message(tensors=client_state, meta={"num_examples": len(client.indices)})

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        replies = list(messages.values())
        weights = self.aggregation_weights(replies)
        self.global_state = weighted_sum([m.tensors for m in replies], weights)
        return {}

    def eval_states(self, store) -> dict[str, State]:
        return {"global": {**self.global_state, **self.server_state}}

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state, "server_state": self.server_state,
                "server_optimizer": self.server_optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
        self.server_state = state["server_state"]
        self.server_optimizer = state["server_optimizer"]
