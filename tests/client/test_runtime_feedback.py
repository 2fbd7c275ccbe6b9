"""Error feedback inside the client runtime (not only the pure functions): what the uplink codec
dropped stays in the client's store entry and joins its next upload, round after round."""

import torch

from fedtune.client.runtime import ClientRuntime, LocalConfig
from fedtune.client.store import ClientStore
from fedtune.comm.channel import Channel, Message
from fedtune.comm.spec import make_codec


class FixedUpdate:
    """A strategy whose client sends the same update every round (no model)."""

    def __init__(self, update):
        self.update = update

    def local_update(self, client, message):
        return Message(tensors={k: v.clone() for k, v in self.update.items()}, meta={"num_examples": 1})


def _runtime(error_feedback: bool) -> ClientRuntime:
    return ClientRuntime(model=None, data=None, shards={0: [0]}, local=LocalConfig(batch_size=1, lr=0.1),
                         store=ClientStore(), channel=Channel(up=make_codec("topk0.25")), seed=0, pad_id=0,
                         device=torch.device("cpu"), error_feedback=error_feedback)


def _rounds(runtime, update, n):
    received = []
    for r in range(n):
        result = runtime.run(FixedUpdate(update), round_idx=r, client_id=0, message=Message())
        received.append(runtime.channel.send(result.message, round_idx=r, client_id=0, direction="up").tensors["w"])
    return received


def test_runtime_error_feedback_delivers_what_top_k_dropped_later():
    # 256 values (the codecs' size floor); top-25% keeps the 64 largest. Values 4 (64 of them) and 1
    # (192 of them): round 0 sends the 4s only; the 1s accumulate in the residual (1, 2, 3 ...) and,
    # by hand, from round 3 (residual 3 + update 1 = 4, tied with the fresh 4s) they start to be sent.
    w = torch.ones(256)
    w[:64] = 4.0
    update = {"w": w}
    with_ef = _runtime(True)
    got = _rounds(with_ef, update, 6)
    residual = with_ef.store.get(0)["ef_residual"]["w"]
    # conservation: everything the client meant to send = what arrived + what it still holds
    torch.testing.assert_close(sum(got) + residual, 6 * w, rtol=0, atol=1e-5)
    assert torch.equal(got[0][:64], w[:64]) and got[0][64:].abs().sum() == 0
    assert sum(g[64:].abs().sum() for g in got) > 0  # the small coordinates did get through, later

    without = _runtime(False)
    plain = _rounds(without, update, 6)
    assert all(p[64:].abs().sum() == 0 for p in plain)  # without EF they never do
    assert "ef_residual" not in without.store.get(0)
