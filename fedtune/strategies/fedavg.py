"""FedAvg over the trainable state (FedLLM in arXiv 2501.04436; McMahan et al. 2017).

Per round, per sampled client:
  down: the global trainable state (LoRA matrices; every parameter with ``lora.enabled=false``).
  up:   the client's trained state + ``num_examples``.
Server: example-weighted (or uniform) mean of the uploaded states becomes the new global state.

The trainable state is what ``lora.mode`` trains: A and B (lora), B only (ffa), the r x r matrices R
after the first round (sb), B then A round by round (alt); each mean is exact for the product it stands for. ``comm.down_delta=true``
sends each client the change since the state it holds (:mod:`fedtune.strategies.downlink`).
"""

from __future__ import annotations

from fedtune.client.runtime import ClientContext
from fedtune.comm.channel import Message
from fedtune.strategies.aggregate import weighted_sum
from fedtune.strategies.base import Strategy, StreamingMean, check_weighting
from fedtune.strategies.downlink import GlobalDownlink


class FedAvg(GlobalDownlink, StreamingMean, Strategy):
    supports_async = True

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting)

    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        return self.send_global(round_idx, client_ids)  # the global state (or each client's delta to it)

    def local_update(self, client: ClientContext, message: Message) -> Message:
        message = self.received(client, message)  # the global state, however it came down
        client.set_trainable(message.tensors)
        with self.training(client, message):  # lora.mode=alt: this round's factor only
            result = client.train()
            trained = client.get_trainable()
        return Message(tensors=trained, meta={"num_examples": result.num_examples})

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        mean = self.folded_mean(messages)  # sync rounds: folded reply by reply as they arrived
        if mean is not None:
            self.global_state = self.merged(mean)
            return {}
        replies = list(messages.values())
        weights = self.aggregation_weights(replies)
        # sum_i a_i theta_i + (1 - sum_i a_i) theta_g: plain FedAvg when every update is fresh (sum a = 1);
        # in async rounds stale updates pull the global state less (FedAsync-style mixing).
        rest = 1.0 - sum(weights)
        states = [m.tensors for m in replies] + ([self.global_state] if abs(rest) > 1e-12 else [])
        self.global_state = self.merged(weighted_sum(states, weights + ([rest] if abs(rest) > 1e-12 else [])))
        return {}
