"""train_local puts the model in training mode, skipping the walk only when it would change nothing."""

import torch

from fedtune.data.format import Tokenized
from fedtune.tensors import structure_changed
from fedtune.train.local import train_local, train_mode


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(4, 10)

    def forward(self, input_ids, attention_mask, labels):
        logits = self.out(self.drop(self.emb(input_ids)))
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())})


def _modes(model):
    return [m.training for m in model.modules()]


def test_every_submodule_trains_after_eval_or_a_submodule_left_in_eval():
    net = _Net()
    train_mode(net)
    net.eval()
    train_mode(net)  # (the walk is cached: the cache must not stand for the modes)
    assert all(_modes(net))
    net.drop.eval()  # one submodule only
    train_mode(net)
    assert all(_modes(net))


def test_a_train_override_is_always_called():
    calls = []

    class Cached(torch.nn.Linear):  # as peft's DoRA layer: train(True) clears a cache
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    net = _Net()
    train_mode(net)
    net.out = Cached(4, 10)
    structure_changed(net)
    train_mode(net)
    train_mode(net)
    assert calls == [True, True]


def test_train_local_trains_with_dropout_after_eval():
    """Dropout on during the update: two updates from the same start with different seeds differ."""
    data = Tokenized(input_ids=[torch.arange(6) % 10] * 8, labels=[torch.arange(6) % 10] * 8)
    finals = []
    for seed in (0, 1):
        torch.manual_seed(0)
        net = _Net()
        net.eval()
        torch.manual_seed(seed)
        train_local(net, data, list(range(8)), num_steps=2, batch_size=4, lr=0.1, weight_decay=0.0, grad_clip=None,
                    generator=torch.Generator().manual_seed(0), pad_id=0, device=torch.device("cpu"))
        assert all(_modes(net))
        finals.append(net.out.weight.detach().clone())
    assert not torch.equal(finals[0], finals[1])
