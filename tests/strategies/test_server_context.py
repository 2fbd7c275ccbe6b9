"""ServerContext: the server's one trainer (KD's distillation) and optimizer step (split's server half)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedtune.client.runtime import LocalConfig
from fedtune.data.format import Tokenized
from fedtune.models.lora import get_trainable_state
from fedtune.seeding import Purpose, generator
from fedtune.strategies.base import ServerContext
from fedtune.train.local import batch_order


def _server(model, seed=7):
    return ServerContext(model=model, tokenizer=SimpleNamespace(pad_token_id=0), task=None,
                         device=torch.device("cpu"), local=LocalConfig(batch_size=2, lr=0.1, grad_clip=None),
                         seed=seed)


def test_server_train_draws_batches_per_seed_round_and_stream():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    data = Tokenized(input_ids=[torch.tensor([1, 2, 3])] * 8, labels=[torch.tensor([1, 2, 3])] * 8)
    server, start = _server(model), get_trainable_state(model)
    seen: list[list[int]] = []

    def loss_fn(m, batch, idx):
        seen.append(list(idx))
        return (m.weight ** 2).sum() + m.bias.sum()

    orders = {}
    for r in (0, 1):
        seen.clear()
        state, result = server.train(start, loss_fn, data=data, steps=3, round_idx=r)
        orders[r] = list(seen)
        # a second path: the same draw straight from the seeding helpers
        expect = [list(i) for i in batch_order(list(range(8)), batch_size=2, num_steps=3,
                                               generator=generator(7, r, Purpose.SERVER))]
        assert orders[r] == expect and result.num_steps == 3
        assert not torch.equal(state["weight"], start["weight"])  # it trained, from `start` each time
    assert orders[0] != orders[1]


def test_server_step_clips_with_the_local_setting():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    server = _server(model)
    server.local.grad_clip = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: the step is -lr x the clipped gradient
    loss = (model.weight * torch.tensor([[3.0, 4.0, 0.0]])).sum()  # gradient (3, 4, 0): norm 5
    server.step(opt, loss, list(model.parameters()))
    assert torch.allclose(model.weight, torch.tensor([[-0.3, -0.4, 0.0]]))  # clipped to norm 0.5
