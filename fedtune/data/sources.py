"""Data sources: build :class:`~fedtune.data.schema.Splits` from a ``data`` config node."""

from __future__ import annotations

import random

from hydra.utils import instantiate
from omegaconf import DictConfig

from fedtune.data.schema import Splits


def load_splits(data_cfg: DictConfig) -> Splits:
    """Instantiate ``data_cfg.source`` and apply ``max_train_samples`` / ``max_eval_samples``.

    Subsampling is seeded by ``data_cfg.seed`` so every run of a sweep sees the same examples.
    """
    splits: Splits = instantiate(data_cfg.source, _convert_="all")
    rng = random.Random(int(data_cfg.get("seed", 0)))
    for split_name, key in (("train", "max_train_samples"), ("eval", "max_eval_samples")):
        limit = data_cfg.get(key)
        rows = getattr(splits, split_name)
        if limit is not None and limit < len(rows):
            keep = sorted(rng.sample(range(len(rows)), int(limit)))
            setattr(splits, split_name, [rows[i] for i in keep])
    return splits
