"""Partitioners: disjoint, covering, seeded, never an empty client; plus the partition report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fedtune.data.partition import IID, Dirichlet, Natural, Quantity, Shards
from fedtune.data.partition_report import Drawing, format_report_table, partition_report, save_heatmap
from fedtune.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf" / "partition"


def classify(num_labels: int = 10, per_label: int = 60) -> list[dict]:
    return [{"text": f"t{i}", "label": i % num_labels} for i in range(num_labels * per_label)]


TOPICS = ["anxiety"] * 50 + ["depression"] * 30 + ["grief"] * 15 + ["sleep"] * 5


def generate() -> list[dict]:
    return [{"prompt": f"q{i}", "response": f"a{i}", "topic": t} for i, t in enumerate(TOPICS)]


def label_shares(examples: list[dict], part: list[int], num_labels: int, key: str = "label") -> np.ndarray:
    return np.bincount([examples[i][key] for i in part], minlength=num_labels) / len(part)


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def assert_valid(parts: list[list[int]], num_clients: int, n: int, *, covering: bool = True) -> None:
    assert len(parts) == num_clients
    assert all(p and p == sorted(p) for p in parts)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "clients overlap"
    assert all(0 <= i < n for i in flat)
    if covering:
        assert sorted(flat) == list(range(n))


ALL = [
    IID(),
    Dirichlet(alpha=0.5),
    Shards(classes_per_client=2),
    Quantity(distribution="power", param=1.5),
    Quantity(distribution="lognormal", param=1.0),
    Natural(),
]


@pytest.mark.parametrize("partitioner", ALL, ids=lambda p: type(p).__name__)
def test_disjoint_covering_deterministic(partitioner) -> None:
    examples = classify()
    parts = partitioner(examples, num_clients=10, seed=0)
    assert_valid(parts, 10, len(examples))
    assert partitioner(examples, num_clients=10, seed=0) == parts
    if not isinstance(partitioner, Natural):  # Natural ignores the seed by design
        assert partitioner(examples, num_clients=10, seed=1) != parts


def test_iid_sizes_and_exact_samples_per_client() -> None:
    examples = classify()
    assert sorted(map(len, IID()(examples[:23], num_clients=4, seed=0))) == [5, 6, 6, 6]
    parts = IID(samples_per_client=167)(examples, num_clients=3, seed=0)
    assert_valid(parts, 3, len(examples), covering=False)
    assert [len(p) for p in parts] == [167, 167, 167]
    assert parts != IID(samples_per_client=167)(examples, num_clients=3, seed=1)


def test_dirichlet_huge_alpha_approaches_iid() -> None:
    examples = classify(num_labels=10, per_label=200)
    parts = Dirichlet(alpha=1e6)(examples, num_clients=4, seed=0)
    assert_valid(parts, 4, len(examples))
    glob = np.full(10, 0.1)
    assert max(tv(label_shares(examples, p, 10), glob) for p in parts) < 0.02
    assert max(map(len, parts)) - min(map(len, parts)) <= 20  # each label split ~evenly too


def test_dirichlet_tiny_alpha_is_skewed() -> None:
    examples = classify(num_labels=10, per_label=200)
    parts = Dirichlet(alpha=0.05)(examples, num_clients=4, seed=0)
    assert_valid(parts, 4, len(examples))
    glob = np.full(10, 0.1)
    assert np.mean([tv(label_shares(examples, p, 10), glob) for p in parts]) > 0.4


def test_dirichlet_over_topic_column_for_generation() -> None:
    examples = generate()
    parts = Dirichlet(alpha=1.0)(examples, num_clients=3, seed=0)  # column=None -> topic
    assert_valid(parts, 3, len(examples))
    assert parts == Dirichlet(alpha=1.0, column="topic")(examples, num_clients=3, seed=0)


def test_dirichlet_exact_samples_per_client() -> None:
    examples = classify(num_labels=10, per_label=200)
    near_iid = Dirichlet(alpha=1e6, samples_per_client=500)(examples, num_clients=3, seed=0)
    skewed = Dirichlet(alpha=0.05, samples_per_client=500)(examples, num_clients=3, seed=0)
    glob = np.full(10, 0.1)
    for parts in (near_iid, skewed):
        assert_valid(parts, 3, len(examples), covering=False)
        assert [len(p) for p in parts] == [500, 500, 500]
    assert max(tv(label_shares(examples, p, 10), glob) for p in near_iid) < 0.1
    assert min(tv(label_shares(examples, p, 10), glob) for p in skewed) > 0.4
    # All 600 examples asked of 3 x 200: pools run dry and clients must take what is left.
    parts = Dirichlet(alpha=0.05, samples_per_client=200)(classify(10, 60), num_clients=3, seed=0)
    assert_valid(parts, 3, 600)


def test_shards_give_each_client_exactly_classes_per_client_labels() -> None:
    examples = classify(num_labels=10, per_label=60)
    for num_clients, per in [(5, 2), (10, 3), (4, 5), (10, 1)]:
        parts = Shards(classes_per_client=per)(examples, num_clients=num_clients, seed=0)
        assert_valid(parts, num_clients, len(examples))
        assert [len({examples[i]["label"] for i in p}) for p in parts] == [per] * num_clients


def test_shards_unbalanced_labels_still_distinct() -> None:
    examples = [{"label": lab} for lab, k in enumerate([100, 40, 30, 20, 10]) for _ in range(k)]
    parts = Shards(classes_per_client=2)(examples, num_clients=5, seed=3)
    assert_valid(parts, 5, 200)
    assert [len({examples[i]["label"] for i in p}) for p in parts] == [2] * 5


def test_quantity_sizes_are_skewed_and_sum_to_n() -> None:
    examples = classify()
    for dist, param in [("power", 1.5), ("lognormal", 1.5)]:
        sizes = sorted(map(len, Quantity(distribution=dist, param=param)(examples, num_clients=10, seed=0)))
        assert sum(sizes) == 600 and sizes[0] >= 1
        assert sizes[-1] >= 5 * sizes[0]
    power = sorted(map(len, Quantity(param=1.0)(examples, num_clients=3, seed=0)), reverse=True)
    assert power == [327, 164, 109]  # 600 x (1, 1/2, 1/3) / (11/6), largest remainder
    assert sorted(map(len, Quantity(param=0.0)(examples, num_clients=4, seed=0))) == [150] * 4
    floored = Quantity(param=3.0, min_size=50)(examples, num_clients=5, seed=0)
    assert min(map(len, floored)) >= 50 and sum(map(len, floored)) == 600


def test_natural_one_client_per_value_in_sorted_order() -> None:
    examples = generate()
    parts = Natural()(examples, num_clients=4, seed=0)
    assert_valid(parts, 4, len(examples))
    assert [{examples[i]["topic"] for i in p} for p in parts] == [
        {"anxiety"},
        {"depression"},
        {"grief"},
        {"sleep"},
    ]
    assert Natural()(examples, num_clients=4, seed=9) == parts


def test_natural_groups_and_balanced_packing() -> None:
    examples = generate()
    groups = [["grief", "anxiety"], ["sleep", "depression"]]
    parts = Natural(groups=groups)(examples, num_clients=2, seed=0)
    assert [len(p) for p in parts] == [65, 35]
    assert {examples[i]["topic"] for i in parts[1]} == {"sleep", "depression"}
    # Greedy largest-first: anxiety(50) -> 0, depression(30) -> 1, grief(15) -> 1, sleep(5) -> 1.
    packed = Natural(column="topic")(examples, num_clients=2, seed=0)
    assert [len(p) for p in packed] == [50, 50]


def test_column_defaults_label_then_topic() -> None:
    both = [{"label": i % 2, "topic": "x" if i < 3 else "y"} for i in range(10)]
    assert [len(p) for p in Natural()(both, num_clients=2, seed=0)] == [5, 5]  # by label, not topic
    assert [len(p) for p in Natural(column="topic")(both, num_clients=2, seed=0)] == [3, 7]


@pytest.mark.parametrize(
    ("make", "kwargs", "key"),
    [
        (IID, {}, "num_clients"),  # more clients than examples
        (lambda: IID(samples_per_client=30), {"num_clients": 2}, "partition.samples_per_client"),
        (lambda: Dirichlet(alpha=0.0), None, "partition.alpha"),
        (lambda: Dirichlet(alpha=0.01, min_size=20, max_tries=3), {"num_clients": 10}, "partition.alpha"),
        (lambda: Dirichlet(column="nope"), {"num_clients": 2}, "partition.column"),
        (lambda: Shards(classes_per_client=5), {"num_clients": 2}, "partition.classes_per_client"),
        (lambda: Quantity(distribution="zipf"), None, "partition.distribution"),
        (lambda: Quantity(min_size=30), {"num_clients": 2}, "partition.min_size"),
        (lambda: Natural(), {"num_clients": 5}, "num_clients"),
        (lambda: Natural(groups=[[0, 1]]), {"num_clients": 2}, "partition.groups"),
        (lambda: Natural(groups=[[0, 1, 2], [3, 9]]), {"num_clients": 2}, "partition.groups"),
        (lambda: Natural(groups=[[0, 1], [2]]), {"num_clients": 2}, "partition.groups"),
        (lambda: Natural(groups=[[0, 1, 2, 3], []]), {"num_clients": 2}, "partition.groups"),
    ],
)
def test_config_errors_name_the_key(make, kwargs, key) -> None:
    examples = classify(num_labels=4, per_label=10)  # 40 examples, labels 0..3
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        partitioner = make()
        partitioner(examples, **{"num_clients": 41, "seed": 0, **(kwargs or {})})
    assert "\n" not in str(err.value)


def test_missing_default_column_asks_for_partition_column() -> None:
    with pytest.raises(ConfigError, match=r"partition\.column.*prompt"):
        Dirichlet()([{"prompt": "p", "response": "r"}] * 4, num_clients=2, seed=0)


def test_report_counts_histograms_table_and_heatmap(tmp_path: Path) -> None:
    examples = classify(num_labels=4, per_label=10)
    parts = Shards(classes_per_client=1)(examples, num_clients=4, seed=0)
    report = partition_report(examples, parts, column="label", label_names=["a", "b", "c", "d"])
    assert json.loads(json.dumps(report)) == report
    assert report["counts"] == [10] * 4 and report["num_examples"] == 40
    assert report["values"] == [0, 1, 2, 3] and report["value_names"] == ["a", "b", "c", "d"]
    assert [sum(h) for h in report["histograms"]] == report["counts"]
    assert np.sum(report["histograms"], axis=0).tolist() == [10] * 4
    assert report["tv_to_global"] == [0.75] * 4 and report["mean_tv_to_global"] == 0.75
    table = format_report_table(report)
    rows = table.splitlines()
    assert rows[0].split() == ["client", "n", "a", "b", "c", "d", "tv"]
    assert [r.split()[0] for r in rows[2:6]] == ["0", "1", "2", "3"]
    assert rows[-1].split() == ["all", "40", "10", "10", "10", "10", "0.750"]
    png = save_heatmap(report, tmp_path / "sub" / "partition.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_many_labels_and_no_column(tmp_path: Path) -> None:
    examples = classify(num_labels=77, per_label=3)
    parts = IID()(examples, num_clients=3, seed=0)
    report = partition_report(examples, parts)
    assert sum(report["counts"]) == 231 and len(report["histograms"][0]) == 77
    rows = format_report_table(report).splitlines()
    assert rows[0].split() == ["client", "n", "#label", "top-3", "tv"] and len(rows) == 7
    assert [r.split()[:2] for r in rows[2:5]] == [["0", "77"], ["1", "77"], ["2", "77"]]
    plain = [{"prompt": "p", "response": "r"}] * 6
    bare = partition_report(plain, IID()(plain, num_clients=2, seed=0))
    assert bare["column"] is None and bare["counts"] == [3, 3] and bare["tv_to_global"] is None
    assert format_report_table(bare).splitlines()[-1].split() == ["all", "6"]
    assert save_heatmap(bare, tmp_path / "bare.png").stat().st_size > 0


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_instantiate_and_run(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert path.read_text().startswith("# fedtune ") and f"partition={path.stem}" in path.read_text()
    partitioner = instantiate(cfg)
    assert type(partitioner).__name__.lower() == path.stem
    examples = classify(num_labels=4, per_label=10)
    assert_valid(partitioner(examples, num_clients=4, seed=0), 4, 40)


def _write_pid(path: Path) -> Path:
    path.write_text(f"{os.getpid()} {os.nice(0)}")  # who drew it, at which priority
    return path


def _slow_write_pid(path: Path) -> Path:
    time.sleep(0.5)
    return _write_pid(path)


def _fail(path: Path) -> Path:
    raise ValueError("no figure today")


def test_drawing_runs_in_a_child_process_and_wait_joins_it(tmp_path: Path) -> None:
    drawing = Drawing(_slow_write_pid, tmp_path / "fig.png")
    assert not drawing.ready()  # still drawing: the caller went on
    assert drawing.wait() == tmp_path / "fig.png" and drawing.ready()
    pid, niceness = map(int, (tmp_path / "fig.png").read_text().split())
    assert pid != os.getpid() and niceness == 19  # another process, at the lowest priority
    assert Drawing(_write_pid, tmp_path / "again.png").wait() == tmp_path / "again.png"


def test_a_failed_drawing_is_a_warning_not_an_error(tmp_path: Path, caplog, capfd) -> None:
    with caplog.at_level("WARNING"):
        assert Drawing(_fail, tmp_path / "fig.png").wait() is None
    assert "partition heatmap was not drawn" in caplog.text
    err = capfd.readouterr().err
    assert "ValueError: no figure today" in err and "Traceback" not in err
