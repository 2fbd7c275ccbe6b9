"""GradualDiff-Fed (arXiv 2506.19164): clients send weight differences, the server adds their mean.

Per round, per client (all K clients in the paper's synchronous setting):
  down: the global trainable state theta_g.
  up:   delta_i = theta_i - theta_g over the trainable (LoRA) parameters + ``num_examples``.
Server: theta_g <- theta_g + server_lr * mean_i(delta_i), the mean uniform 1/K as in the paper
(``weighting=examples`` for a shard-size-weighted mean). With server_lr=1 and the same weights this
is FedAvg; deltas are what make compression pay (see the ``comm`` codecs).

``lora.mode`` (ffa: B only; sb: the r x r matrices R after the first round; alt: B, then A) and ``comm.down_delta`` work
as with FedAvg (:mod:`fedtune.strategies.downlink`): the deltas are over whatever is trainable.
"""

from __future__ import annotations

from fedtune.client.runtime import ClientContext
from fedtune.comm.channel import Message
from fedtune.errors import ConfigError
from fedtune.strategies.aggregate import add_scaled, subtract, weighted_sum
from fedtune.strategies.base import Strategy, StreamingMean, check_weighting
from fedtune.strategies.downlink import GlobalDownlink


class GradualDiff(GlobalDownlink, StreamingMean, Strategy):
    supports_async = True

    def __init__(self, *, server_lr: float = 1.0, weighting: str = "uniform") -> None:
        if server_lr <= 0:
            raise ConfigError(f"strategy.server_lr={server_lr}: must be > 0 (the paper uses 1.0)")
        self.server_lr = float(server_lr)
        self.weighting = check_weighting(weighting)

    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        return self.send_global(round_idx, client_ids)  # the global state (or each client's delta to it)

    def local_update(self, client: ClientContext, message: Message) -> Message:
        message = self.received(client, message)  # the global state, however it came down
        client.set_trainable(message.tensors)
        with self.training(client, message):  # lora.mode=alt: this round's factor only
            result = client.train()
            trained = client.get_trainable()
        delta = subtract(trained, {k: message.tensors[k] for k in trained})
        return Message(tensors=delta, meta={"num_examples": result.num_examples})

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        mean_delta = self.folded_mean(messages)  # sync rounds: folded reply by reply as they arrived
        if mean_delta is None:
            replies = list(messages.values())
            mean_delta = weighted_sum([m.tensors for m in replies], self.aggregation_weights(replies))
        covered = {k: self.global_state[k] for k in mean_delta}  # every entry, or (alt) this round's factor
        self.global_state = self.merged(add_scaled(covered, mean_delta, self.server_lr))
        return {}
