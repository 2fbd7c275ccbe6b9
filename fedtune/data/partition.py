"""Federated partitioners: split a list of examples into disjoint per-client index lists.

Each partitioner is a small class whose keyword-only constructor holds its config (built by
``hydra.utils.instantiate(cfg.partition)``) and whose call maps ``(examples, num_clients, seed)`` to
one sorted list of example indices per client. Every partitioner guarantees: the lists are disjoint,
no client is empty (else a one-line :class:`~fedtune.errors.ConfigError`), all examples are assigned
unless ``samples_per_client`` asks for an exact-size seeded subsample, and every random draw comes
from ``numpy.random.default_rng(seed)``, so the same seed gives the same split.

The reporting side (histograms, table, heatmap) lives in :mod:`fedtune.data.partition_report`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import numpy as np

from fedtune.data.schema import Example
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

Parts = list[list[int]]


class Partitioner(Protocol):
    """What every partitioner is: ``(examples, num_clients, seed)`` -> sorted indices per client."""

    def __call__(self, examples: Sequence[Example], *, num_clients: int, seed: int) -> Parts: ...


def resolve_column(examples: Sequence[Example], column: str | None) -> str:
    """The column to skew or group by: ``column``, else ``label``, else ``topic``."""
    keys = sorted(examples[0]) if examples else []
    if column is None:
        for default in ("label", "topic"):
            if default in keys:
                return default
        raise ConfigError(f"examples have no 'label' or 'topic' key; set partition.column to one of {keys}")
    if column not in keys:
        raise ConfigError(f"partition.column={column!r} is not a key of the examples; choose one of {keys}")
    return column


def encode_column(examples: Sequence[Example], column: str) -> tuple[list[Any], np.ndarray]:
    """Return the sorted distinct values of ``column`` and each example's index into them."""
    try:
        raw = [ex[column] for ex in examples]
    except KeyError:
        raise ConfigError(
            f"some examples lack partition.column={column!r}; pick a key every example has"
        ) from None
    if not all(isinstance(v, Hashable) for v in raw):
        raise ConfigError(f"partition.column={column!r} holds unhashable values; pick a scalar column")
    try:
        values = sorted(set(raw))
    except TypeError:  # mixed types: any fixed order will do
        values = sorted(set(raw), key=repr)
    index = {v: i for i, v in enumerate(values)}
    return values, np.array([index[v] for v in raw], dtype=np.int64)


def _check_counts(num_examples: int, num_clients: int, samples_per_client: int | None = None) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be >= 1")
    if num_clients > num_examples:
        raise ConfigError(
            f"more clients than examples: num_clients={num_clients} > {num_examples} examples; lower num_clients"
        )
    if samples_per_client is None:
        return
    if samples_per_client < 1:
        raise ConfigError(f"partition.samples_per_client={samples_per_client} must be >= 1 (or null for all)")
    if samples_per_client * num_clients > num_examples:
        raise ConfigError(
            f"partition.samples_per_client={samples_per_client} x num_clients={num_clients} > {num_examples} "
            "examples; lower either, or set partition.samples_per_client=null"
        )


def _finish(parts: Sequence[Sequence[int] | np.ndarray], hint: str) -> Parts:
    """Sort each client's indices; reject empty clients; assert disjointness."""
    out = [sorted(int(i) for i in p) for p in parts]
    empty = [c for c, p in enumerate(out) if not p]
    if empty:
        raise ConfigError(f"client(s) {empty} got no examples; {hint}")
    assert sum(map(len, out)) == len(set().union(*out)), "partitions overlap"
    return out


def _apportion(weights: np.ndarray, total: int, floor: int) -> np.ndarray:
    """Sizes >= ``floor`` summing to ``total``, the rest split by ``weights`` (largest remainder)."""
    share = weights / weights.sum() * (total - floor * len(weights))
    sizes = floor + np.floor(share).astype(np.int64)
    # Stable sort: ties go to the lower client id, so sizes depend on the weights only.
    sizes[np.argsort(np.floor(share) - share, kind="stable")[: total - int(sizes.sum())]] += 1
    return sizes


class IID:
    """Uniformly random equal-size split (sizes differ by at most one).

    Args:
        samples_per_client: if set, each client gets exactly this many examples of a seeded
            subsample; the rest are unused.
    """

    def __init__(self, *, samples_per_client: int | None = None) -> None:
        self.samples_per_client = samples_per_client

    def __call__(self, examples: Sequence[Example], *, num_clients: int, seed: int) -> Parts:
        n, spc = len(examples), self.samples_per_client
        _check_counts(n, num_clients, spc)
        order = np.random.default_rng(seed).permutation(n)
        chosen = order if spc is None else order[: spc * num_clients]
        return _finish(np.array_split(chosen, num_clients), "lower num_clients")


class Dirichlet:
    """Label skew: each label's examples are split over clients by proportions ~ Dir(alpha).

    Small ``alpha`` (0.1) gives each client a few dominant labels; large ``alpha`` (100+) tends to
    IID. With ``samples_per_client`` the sizes are exact instead: each client draws a label mix
    ~ Dir(alpha * num_values * global_prior) and fills its quota label by label without
    replacement, so for balanced labels ``alpha`` has the same per-label meaning in both modes.

    Args:
        alpha: Dirichlet concentration; lower is more skewed.
        column: the key to skew over; ``None`` means ``label``, else ``topic``.
        min_size: redraw until every client holds at least this many examples.
        max_tries: draws before giving up with a :class:`ConfigError`.
        samples_per_client: exact per-client size of a seeded subsample (``min_size`` unused).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        column: str | None = None,
        min_size: int = 1,
        max_tries: int = 100,
        samples_per_client: int | None = None,
    ) -> None:
        if not alpha > 0:
            raise ConfigError(f"partition.alpha={alpha} must be > 0 (e.g. 0.1 skewed, 100 near IID)")
        self.alpha = float(alpha)
        self.column = column
        self.min_size = int(min_size)
        self.max_tries = int(max_tries)
        self.samples_per_client = samples_per_client

    def __call__(self, examples: Sequence[Example], *, num_clients: int, seed: int) -> Parts:
        _check_counts(len(examples), num_clients, self.samples_per_client)
        _, codes = encode_column(examples, resolve_column(examples, self.column))
        rng = np.random.default_rng(seed)
        if self.samples_per_client is not None:
            parts = self._exact(codes, num_clients, self.samples_per_client, rng)
            return _finish(parts, "raise partition.samples_per_client")
        by_value = [np.flatnonzero(codes == v) for v in range(int(codes.max()) + 1)]
        for _ in range(self.max_tries):
            parts = [[] for _ in range(num_clients)]
            for idx in by_value:
                idx = rng.permutation(idx)
                cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, self.alpha))) * len(idx)).astype(int)
                for client_id, chunk in enumerate(np.split(idx, cuts[:-1])):
                    parts[client_id].extend(chunk.tolist())
            if min(map(len, parts)) >= self.min_size:
                return _finish(parts, "raise partition.alpha")
        raise ConfigError(
            f"no Dirichlet draw in {self.max_tries} tries gave every client >= {self.min_size} examples; "
            f"raise partition.alpha (now {self.alpha}) or lower num_clients (now {num_clients})"
        )

    def _exact(self, codes: np.ndarray, num_clients: int, spc: int, rng: np.random.Generator) -> Parts:
        num_values = int(codes.max()) + 1
        pools = [rng.permutation(np.flatnonzero(codes == v)).tolist() for v in range(num_values)]
        left = np.array([len(p) for p in pools], dtype=np.float64)
        mix = rng.dirichlet(self.alpha * num_values * left / left.sum(), size=num_clients)
        # A random interleaving of the clients' slots, so no client has first pick of every pool.
        slots = rng.permutation(np.repeat(np.arange(num_clients), spc))
        draws = rng.random(len(slots))
        parts: Parts = [[] for _ in range(num_clients)]
        for client_id, u in zip(slots, draws):
            weights = mix[client_id] * (left > 0)
            if not weights.sum() > 0:  # the client's labels are used up: take what is left
                weights = left.copy()
            cum = np.cumsum(weights)
            v = int(np.searchsorted(cum, u * cum[-1], side="right"))
            if v >= num_values or left[v] == 0:  # float round-off at the top end
                v = int(np.flatnonzero(weights)[-1])
            parts[client_id].append(pools[v].pop())
            left[v] -= 1
        return parts


class Shards:
    """Pathological label skew (McMahan et al., 2017): each client holds ``classes_per_client`` labels.

    Examples are sorted by label and cut into ``num_clients * classes_per_client`` shards; client
    ``i`` gets every ``num_clients``-th shard. Shards are cut inside label boundaries (each label
    gets shards in proportion to its size), so a client gets exactly ``classes_per_client``
    distinct labels whenever no label needs more than ``num_clients`` shards. If there are fewer
    shards than labels, shards span several labels and clients hold more labels (a warning says so).

    Args:
        classes_per_client: labels per client; 1 is the most extreme skew.
        column: the key to shard by; ``None`` means ``label``, else ``topic``.
    """

    def __init__(self, *, classes_per_client: int = 2, column: str | None = None) -> None:
        self.classes_per_client = int(classes_per_client)
        self.column = column

    def __call__(self, examples: Sequence[Example], *, num_clients: int, seed: int) -> Parts:
        n, per = len(examples), self.classes_per_client
        _check_counts(n, num_clients)
        values, codes = encode_column(examples, resolve_column(examples, self.column))
        if not 1 <= per <= len(values):
            raise ConfigError(
                f"partition.classes_per_client={per} must be between 1 and the {len(values)} distinct labels"
            )
        num_shards = num_clients * per
        if num_shards > n:
            raise ConfigError(
                f"partition.classes_per_client={per} x num_clients={num_clients} shards > {n} examples; lower either"
            )
        rng = np.random.default_rng(seed)
        label_order = rng.permutation(len(values))
        pools = [rng.permutation(np.flatnonzero(codes == v)) for v in label_order]
        if num_shards >= len(values):
            counts = self._shards_per_label(np.array([len(p) for p in pools]), num_shards, num_clients)
            shards = [s for pool, k in zip(pools, counts) for s in np.array_split(pool, k)]
        else:
            msg = "num_clients x partition.classes_per_client = %d shards < %d labels: clients get ~%d labels"
            log.warning(msg, num_shards, len(values), -(-len(values) // num_clients))
            shards = np.array_split(np.concatenate(pools), num_shards)
        client_of_slot = rng.permutation(num_clients)
        parts: Parts = [[] for _ in range(num_clients)]
        for s, shard in enumerate(shards):
            parts[client_of_slot[s % num_clients]].extend(shard.tolist())
        return _finish(parts, "lower num_clients")

    @staticmethod
    def _shards_per_label(sizes: np.ndarray, num_shards: int, num_clients: int) -> np.ndarray:
        """One shard per label, then D'Hondt by size; cap at ``num_clients`` while the cap is feasible."""
        counts = np.ones(len(sizes), dtype=np.int64)
        cap = np.minimum(sizes, num_clients) if np.minimum(sizes, num_clients).sum() >= num_shards else sizes
        for _ in range(num_shards - len(sizes)):
            quotient = np.where(counts < cap, sizes / (counts + 1), -1.0)
            counts[int(np.argmax(quotient))] += 1
        return counts


class Quantity:
    """Size skew: random examples, client sizes ~ a power law or a lognormal.

    Args:
        distribution: ``power`` (weights ``rank ** -param``, ranks shuffled over clients) or
            ``lognormal`` (weights ~ LogNormal(0, sigma=param)).
        param: skew strength; 0 gives equal sizes, larger is more skewed.
        min_size: floor on every client's size.
    """

    def __init__(self, *, distribution: str = "power", param: float = 1.5, min_size: int = 1) -> None:
        if distribution not in ("power", "lognormal"):
            raise ConfigError(
                f"partition.distribution={distribution!r} is unknown; use 'power' or 'lognormal'"
            )
        if param < 0:
            raise ConfigError(f"partition.param={param} must be >= 0 (0 = equal sizes)")
        if min_size < 1:
            raise ConfigError(f"partition.min_size={min_size} must be >= 1")
        self.distribution = distribution
        self.param = float(param)
        self.min_size = int(min_size)

    def __call__(self, examples: Sequence[Example], *, num_clients: int, seed: int) -> Parts:
        n = len(examples)
        _check_counts(n, num_clients)
        if self.min_size * num_clients > n:
            raise ConfigError(
                f"partition.min_size={self.min_size} x num_clients={num_clients} > {n} examples; lower either"
            )
        rng = np.random.default_rng(seed)
        if self.distribution == "power":
            weights = rng.permutation(np.arange(1, num_clients + 1, dtype=np.float64) ** -self.param)
        else:
            weights = rng.lognormal(0.0, self.param, size=num_clients)
        sizes = _apportion(weights, n, floor=self.min_size)
        return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]), "raise partition.min_size")


class Natural:
    """One client per distinct value of a column (e.g. CounselChat ``topic``), or per group of values.

    Deterministic: ``seed`` is unused. When ``num_clients`` is below the number of values and no
    ``groups`` are given, values go largest-first to the currently smallest client.

    Args:
        column: the key to group by; ``None`` means ``label``, else ``topic``.
        groups: explicit list of value lists, one per client (must cover every value once).
    """

    def __init__(self, *, column: str | None = None, groups: Sequence[Sequence[Any]] | None = None) -> None:
        self.column = column
        self.groups = None if groups is None else [list(g) for g in groups]

    def __call__(self, examples: Sequence[Example], *, num_clients: int, seed: int) -> Parts:
        del seed  # deterministic by design
        _check_counts(len(examples), num_clients)
        values, codes = encode_column(examples, resolve_column(examples, self.column))
        if self.groups is not None:
            client_of_value = self._from_groups(values, num_clients)
        elif num_clients == len(values):
            client_of_value = np.arange(len(values))
        elif num_clients < len(values):
            client_of_value = self._balanced(np.bincount(codes, minlength=len(values)), num_clients)
        else:
            raise ConfigError(
                f"num_clients={num_clients} > {len(values)} distinct values of the partition column; "
                f"set num_clients<={len(values)}"
            )
        owner = client_of_value[codes]
        return _finish(
            [np.flatnonzero(owner == c).tolist() for c in range(num_clients)], "check partition.groups"
        )

    def _from_groups(self, values: list[Any], num_clients: int) -> np.ndarray:
        groups = self.groups or []
        if len(groups) != num_clients:
            raise ConfigError(
                f"partition.groups has {len(groups)} groups but num_clients={num_clients}; make them equal"
            )
        index = {v: i for i, v in enumerate(values)}
        client_of_value = np.full(len(values), -1, dtype=np.int64)
        for client_id, group in enumerate(groups):
            for v in group:
                if v not in index:
                    raise ConfigError(
                        f"partition.groups value {v!r} is not in the column; values are {values}"
                    )
                if client_of_value[index[v]] >= 0:
                    raise ConfigError(f"partition.groups lists {v!r} twice; give each value to one client")
                client_of_value[index[v]] = client_id
        missing = [values[i] for i in np.flatnonzero(client_of_value < 0)]
        if missing:
            raise ConfigError(f"partition.groups misses values {missing}; add each to a group")
        return client_of_value

    @staticmethod
    def _balanced(sizes: np.ndarray, num_clients: int) -> np.ndarray:
        totals = np.zeros(num_clients, dtype=np.int64)
        client_of_value = np.empty(len(sizes), dtype=np.int64)
        for v in np.argsort(-sizes, kind="stable"):
            client_id = int(np.argmin(totals))
            client_of_value[v] = client_id
            totals[client_id] += sizes[v]
        return client_of_value
