"""A simulated clock: what a round would take in a deployment with heterogeneous clients.

Each client gets a profile from the seed: a compute-time multiplier (``clients.speed``) and, with a
``network`` model, its bandwidths and latency. A client's time for one update is::

    flops / clients.flops_per_s * speed  +  server_flops / server_flops_per_s
      +  down_bytes / down_bps + up_bytes / up_bps  +  round_trips * 2 * latency

A round trip is one message each way (down + up), each paying the latency once. A plain update makes
one (the download, then the upload). Split learning makes one per local step on top of that
(activations up, cut gradients down) and waits for the server's half of every step: its FLOPs run
on the server, at ``server_flops_per_s`` (default: the reference client's ``clients.flops_per_s``;
the server's speed does not depend on the client's ``speed``). ``up_bytes``/``down_bytes`` are every
byte of the update the channel counted, the per-step tensors included.

Compute time comes from the update's FLOPs (deterministic), not the simulator's wall clock, so the
simulated clock (and the async schedule built on it) is reproducible run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from fedtune.errors import ConfigError
from fedtune.seeding import Purpose, derive_seed

DISTS = ("constant", "uniform", "lognormal", "choice")


@dataclass(frozen=True)
class ClientProfile:
    speed: float  # compute-time multiplier (2.0 = twice as slow as the reference device)
    up_bps: float | None  # bytes per second, None = instantaneous
    down_bps: float | None
    latency_s: float


REFERENCE = ClientProfile(1.0, None, None, 0.0)  # the server-side trainer (centralized baseline)


def _draw(rng: np.random.Generator, spec: DictConfig, n: int, key: str) -> np.ndarray:
    dist = spec.dist
    if dist == "constant":
        return np.full(n, float(spec.value))
    if dist == "uniform":
        return rng.uniform(float(spec.low), float(spec.high), n)
    if dist == "lognormal":
        return float(spec.value) * rng.lognormal(0.0, float(spec.sigma), n)
    if dist == "choice":
        return rng.choice(np.asarray(list(spec["choices"]), dtype=float), n)
    raise ConfigError(f"{key}.dist={dist}: choose one of {', '.join(DISTS)}")


def client_profiles(clients: DictConfig, network: DictConfig, *, num_clients: int, seed: int) -> list[ClientProfile]:
    """Deterministic per-client profiles from the ``clients`` and ``network`` config nodes."""
    rng = np.random.default_rng(derive_seed(seed, 0, Purpose.PROFILE))
    speed = _draw(rng, clients.speed, num_clients, "clients.speed")
    if (speed <= 0).any():
        raise ConfigError("clients.speed: multipliers must be > 0")
    if network.get("up_mbps") is None:
        return [ClientProfile(float(s), None, None, 0.0) for s in speed]
    spread = rng.lognormal(0.0, float(network.get("spread", 0.0)), num_clients)  # per-client link quality
    up = float(network.up_mbps) * 1e6 / 8 / spread
    down = float(network.down_mbps) * 1e6 / 8 / spread
    latency = float(network.latency_ms) / 1e3
    return [ClientProfile(float(s), float(u), float(d), latency) for s, u, d in zip(speed, up, down)]


def client_time(
    profile: ClientProfile,
    *,
    flops: float,
    flops_per_s: float,
    up_bytes: int,
    down_bytes: int,
    round_trips: int = 1,
    server_flops: float = 0.0,
    server_flops_per_s: float | None = None,
) -> float:
    """Simulated seconds for one client's update (download + compute + upload; see the module docstring)."""
    t = flops / flops_per_s * profile.speed
    if server_flops:
        t += server_flops / (server_flops_per_s or flops_per_s)
    if profile.up_bps is not None:
        assert profile.down_bps is not None  # client_profiles sets both links or neither
        t += up_bytes / profile.up_bps + down_bytes / profile.down_bps + round_trips * 2 * profile.latency_s
    return t
