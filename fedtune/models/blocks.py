"""Blocks of a decoder-only transformer: contiguous groups of its layers, partial loads, layer dropping.

Used by block-wise strategies (FedCyBGD). A model's parameters are split into ``num_blocks``
blocks: the decoder layers in contiguous groups (block ``b`` holds layers
``[b*L//B, (b+1)*L//B)``: sizes differ by at most one, the larger groups last); block 0 also owns the
input embeddings and the last block the final norm and the output head (``lm_head`` or ``score``),
so one block covers every parameter. Names are the model's own ``named_parameters`` names (a
peft-free model: exactly the trainable state with ``lora.enabled=false``).

Supported layouts (the decoder-layer list, and the input-embedding prefixes of block 0):
Llama-family (``model.layers``, ``model.embed_tokens``) and GPT-2 (``transformer.h``,
``transformer.wte``/``wpe``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedtune.tensors import structure_changed

# decoder-layer list -> prefixes of the input embeddings (owned by block 0)
LAYOUTS: dict[str, tuple[str, ...]] = {
    "model.layers": ("model.embed_tokens.",),
    "transformer.h": ("transformer.wte.", "transformer.wpe."),
}


@dataclass(frozen=True)
class BlockLayout:
    """Which parameter names make up each block.

    Attributes:
        layers_path: dotted path of the decoder-layer ``ModuleList`` (``model.layers``).
        num_layers: decoder layers in the model.
        layers: per block, the indices of its decoder layers.
        keys: per block, its parameter names (in the model's order).
        frame: names outside the decoder layers (embeddings, final norm, head): every forward needs them.
    """

    layers_path: str
    num_layers: int
    layers: tuple[tuple[int, ...], ...]
    keys: tuple[tuple[str, ...], ...]
    frame: frozenset[str]

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a parameter belongs to (None for the frame)."""
        m = re.match(rf"{re.escape(self.layers_path)}\.(\d+)\.", name)
        return int(m.group(1)) if m else None


def find_layers_path(names: Iterable[str]) -> str | None:
    """The known decoder-layer path these parameter names use, or None."""
    names = list(names)
    for path in LAYOUTS:
        if any(n.startswith(path + ".") for n in names):
            return path
    return None


def num_layers_of(names: Iterable[str], layers_path: str) -> int:
    pattern = re.compile(rf"{re.escape(layers_path)}\.(\d+)\.")
    return 1 + max(int(m.group(1)) for n in names if (m := pattern.match(n)))


def block_layout(names: Sequence[str], *, layers_path: str, num_blocks: int) -> BlockLayout:
    """Split ``names`` into ``num_blocks`` blocks (1 <= num_blocks <= number of decoder layers)."""
    num_layers = num_layers_of(names, layers_path)
    assert 1 <= num_blocks <= num_layers, (num_blocks, num_layers)
    layers = tuple(tuple(range(b * num_layers // num_blocks, (b + 1) * num_layers // num_blocks))
                   for b in range(num_blocks))
    block_of_layer = {i: b for b, group in enumerate(layers) for i in group}
    inputs = LAYOUTS[layers_path]
    keys: list[list[str]] = [[] for _ in range(num_blocks)]
    frame = set()
    pattern = re.compile(rf"{re.escape(layers_path)}\.(\d+)\.")
    for name in names:
        if m := pattern.match(name):
            keys[block_of_layer[int(m.group(1))]].append(name)
        else:
            frame.add(name)
            keys[0 if name.startswith(inputs) else num_blocks - 1].append(name)
    return BlockLayout(layers_path=layers_path, num_layers=num_layers, layers=layers,
                       keys=tuple(tuple(k) for k in keys), frame=frozenset(frame))


def set_partial_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the named parameters it names; other parameters are left as they are.

    Raises:
        KeyError: a name the model does not have (strict: a typo must not load nothing silently).
    """
    params = dict(model.named_parameters())
    unknown = set(state) - set(params)
    if unknown:
        raise KeyError(f"partial state has keys the model does not: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


@contextmanager
def only_layers(model: torch.nn.Module, layers_path: str, keep: Sequence[int]) -> Iterator[None]:
    """Within the block, the model's decoder-layer list holds only the layers ``keep`` (layer dropping).

    The dropped layers are really out of the model (its forward skips them; ``model.parameters()``
    does not hold them); the full list is put back on exit, even on error.
    """
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in sorted(keep)]))
    structure_changed(model)
    try:
        yield
    finally:
        setattr(parent, attr, full)
        structure_changed(model)
