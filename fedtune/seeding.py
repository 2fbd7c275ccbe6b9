"""Every random draw comes from a seed derived from (seed, round_idx, client_id, purpose)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    """What a random stream is for: the last key of every derived seed, so streams never overlap (the
    sampler's draws never depend on a client's training). Values are fixed: changing one changes runs."""

    SAMPLE = 1  # client sampling and async dispatch
    TRAIN = 2  # a client's batch order and dropout
    INIT = 3  # model and LoRA initialisation
    KD_PUBLIC = 11  # KD: a client's public batches for its KD term
    SERVER = 12  # computation on the server (KD's distillation): batch order and dropout
    PROFILE = 21  # the simulated clients' speeds and links


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence mixing: no collisions in practice)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator(*keys: int) -> torch.Generator:
    """A torch CPU generator seeded from ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def seed_global(seed: int, device: torch.device) -> None:
    """Seed torch's global RNG (what dropout draws from) for work on ``device``: ``torch.manual_seed``,
    which also seeds every accelerator backend (~0.2-0.35 ms a call), or on the CPU only the CPU
    generator ``torch.manual_seed`` seeds (the same draws, ~1 us)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def sample_clients(*, seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> list[int]:
    """The round's participants: all of them, or a seeded sample without replacement (sorted)."""
    if clients_per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_idx, Purpose.SAMPLE))
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))
