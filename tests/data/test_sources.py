"""Data sources: every reader path on tiny files, bad-row policies, hold-out, and the real data sets."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from fedtune.data import sources
from fedtune.data.schema import Splits
from fedtune.errors import ConfigError

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: a hub load must fail fast, never hang
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")


def data_cfg(name: str = "files", **overrides: Any) -> Any:
    """A ``data`` node shaped like conf/data/<name>.yaml (composed without Hydra), overrides applied."""
    node = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    root = OmegaConf.create({"data": node})
    for key, value in overrides.items():
        OmegaConf.update(root, f"data.{key}", value, merge=False)
    return root.data


def load(name: str = "files", **overrides: Any) -> Splits:
    return sources.load_splits(data_cfg(name, **overrides))


def config_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# -- formats -------------------------------------------------------------------------------------


def test_csv_column_mapping_keeps_other_columns(tmp_path: Path) -> None:
    f = write(tmp_path / "qa.csv", "question,answer,topic\nhi?,hello,greet\nbye?,ciao,greet\n")
    s = load(path=str(f), columns={"prompt": "question", "response": "answer"}, eval_fraction=0.5)
    assert s.task == "generate" and len(s.train) == len(s.eval) == 1
    assert {"prompt": "hi?", "response": "hello", "topic": "greet"} in s.train + s.eval
    assert s.info["num_rows_read"] == 2 and s.info["num_rows_skipped"] == 0


def test_multiline_quoted_csv(tmp_path: Path) -> None:
    body = 'prompt,response\n"line one\nline two, with comma","she said ""yes"""\nq2,a2\n'
    s = sources.files(path=str(write(tmp_path / "m.csv", body)), task="generate")
    assert s.train[0] == {"prompt": "line one\nline two, with comma", "response": 'she said "yes"'}
    assert len(s.train) == 2


def test_tsv_quoting_off_keeps_quote_chars(tmp_path: Path) -> None:
    body = 'sentence\tlabel\nhe said "great \t1\n" odd start\t0\nplain\t1\n'
    s = sources.sst2(path=str(write(tmp_path / "t.tsv", body)))
    assert [e["text"] for e in s.train] == ['he said "great ', '" odd start', "plain"]
    assert [e["label"] for e in s.train] == [1, 0, 1] and s.label_names == ["negative", "positive"]


@pytest.mark.parametrize(
    "name, text",
    [
        ("list.json", json.dumps([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}])),
        (
            "wrapped.json",
            json.dumps({"data": [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]}),
        ),
        ("lines.json", '{"prompt": "p1", "response": "r1"}\n{"prompt": "p2", "response": "r2"}\n'),
        ("rows.jsonl", '{"prompt": "p1", "response": "r1"}\n\n{"prompt": "p2", "response": "r2"}\n'),
    ],
)
def test_json_variants(tmp_path: Path, name: str, text: str) -> None:
    s = sources.files(path=str(write(tmp_path / name, text)), task="generate")
    assert s.train == [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]


def test_parquet_classify_with_int_labels_and_text_pair(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": ["x", "y", "z", "w"], "b": ["1", "2", "3", "4"], "y": [10, 2, 0, 2]})
    pq.write_table(table, tmp_path / "d.parquet")
    s = sources.files(
        path=str(tmp_path / "d.parquet"),
        task="classify",
        columns={"text": "a", "text_pair": "b", "label": "y"},
    )
    assert s.label_names == ["0", "2", "10"]  # integers sort numerically
    assert s.train[0] == {"text": "x", "text_pair": "1", "label": 2}


def test_string_labels_sorted_case_insensitively_and_fixed_names(tmp_path: Path) -> None:
    f = write(tmp_path / "c.csv", "text,label\na,beta\nb,Alpha\nc,gamma\n")
    assert sources.files(path=str(f), task="classify").label_names == ["Alpha", "beta", "gamma"]
    fixed = sources.files(path=str(f), task="classify", label_names=["gamma", "beta", "Alpha"])
    assert [e["label"] for e in fixed.train] == [1, 2, 0]


def test_folder_prefers_dev_over_unlabeled_test(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\nok\t1\n")
    write(tmp_path / "test.tsv", "index\tsentence\n0\tunlabeled\n")
    s = load("sst2", path=str(tmp_path))
    assert (len(s.train), len(s.eval)) == (2, 1)
    assert s.info["files"]["eval"].endswith("dev.tsv") and s.info["eval_from"] == str(tmp_path / "dev.tsv")


def test_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"q": ["a", "b"], "r": ["1", "2"]}),
            "validation": datasets.Dataset.from_dict({"q": ["c"], "r": ["3"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    s = sources.files(path=str(tmp_path / "ds"), task="generate", columns={"prompt": "q", "response": "r"})
    assert (len(s.train), s.eval) == (2, [{"prompt": "c", "response": "3"}])


def test_hub_route_decodes_class_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    names = ["negative", "positive"]
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": labels}, features=features)
            for split, labels in (("train", [1, 0]), ("validation", [0, 1]), ("test", [-1, -1]))
        }
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: calls.append(args) or dd)
    s = sources.sst2()
    assert calls == [("nyu-mll/glue", "sst2")] and s.info["hub_id"] == "nyu-mll/glue"
    assert [e["label"] for e in s.train] == [1, 0] and [e["label"] for e in s.eval] == [0, 1]


# -- named sources on tiny files ---------------------------------------------------------------


def test_alpaca_flat_and_seed_task_shapes(tmp_path: Path) -> None:
    flat = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Hi.", "input": "", "output": "Hey"},
    ]
    s = sources.alpaca(path=str(write(tmp_path / "a.json", json.dumps(flat))))
    assert [e["prompt"] for e in s.train] == ["Add.\n\n1 2", "Hi."]
    seed = {
        "instruction": "Opposite?",
        "instances": [{"input": "hot", "output": "cold"}, {"input": "", "output": "x"}],
    }
    s = sources.alpaca(path=str(write(tmp_path / "s.jsonl", json.dumps(seed) + "\n")))
    assert s.train == [
        {"prompt": "Opposite?\n\nhot", "response": "cold"},
        {"prompt": "Opposite?", "response": "x"},
    ]


def counsel_csv(path: Path, *, with_split: bool) -> Path:
    header = ",questionID,questionTitle,questionText,topic,answerText" + (",split" if with_split else "")
    rows = [f'{i},{i // 2},T{i // 2},"body\nmore",{"ab"[i % 2]},ans{i}' for i in range(12)]
    if with_split:
        rows = [f"{r},{['train', 'val', 'test'][i % 3]}" for i, r in enumerate(rows)]
    return write(path, "\n".join([header, *rows]) + "\n")


def test_counsel_chat_split_column_and_group_holdout(tmp_path: Path) -> None:
    s = load("counsel_chat", path=str(counsel_csv(tmp_path / "cc.csv", with_split=True)))
    assert (len(s.train), len(s.eval)) == (4, 8) and s.train[0]["prompt"] == "T0\nbody\nmore"
    assert set(s.train[0]) == {"prompt", "response", "topic", "question_id"}
    s = load("counsel_chat", path=str(counsel_csv(tmp_path / "ns.csv", with_split=False)), eval_fraction=0.3)
    train_q, eval_q = {e["question_id"] for e in s.train}, {e["question_id"] for e in s.eval}
    assert not train_q & eval_q and len(eval_q) == 2 and len(s.eval) == 4  # whole questions held out


def test_banking77_local_csv_uses_category_column(tmp_path: Path) -> None:
    write(
        tmp_path / "train.csv",
        "text,category\nwhere is my card?,card_arrival\nrefund pls,Refund_not_showing_up\n",
    )
    write(tmp_path / "test.csv", "text,category\ncard?,card_arrival\n")
    s = sources.banking77(path=str(tmp_path))
    assert s.label_names == ["card_arrival", "Refund_not_showing_up"] and s.eval == [
        {"text": "card?", "label": 0}
    ]


# -- errors and bad rows ----------------------------------------------------------------------


def test_missing_file_shows_path_as_given(tmp_path: Path) -> None:
    assert "data.path=nope/x.csv: no such file" in config_error(
        sources.files, path="nope/x.csv", task="generate"
    )


def test_unknown_column_lists_available(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", "question,answer\nq,a\n")
    msg = config_error(load, path=str(f), columns={"prompt": "quest", "response": "answer"})
    assert "no column 'quest' (data.columns.prompt)" in msg and "available: 'question', 'answer'" in msg


@pytest.mark.parametrize(
    "name, text", [("e.csv", ""), ("h.csv", "prompt,response\n"), ("b.jsonl", "\n\n"), ("l.json", "[]")]
)
def test_empty_files(tmp_path: Path, name: str, text: str) -> None:
    assert "empty file" in config_error(
        sources.files, path=str(write(tmp_path / name, text)), task="generate"
    )


def test_bad_rows_fail_with_row_number_or_skip_and_count(tmp_path: Path) -> None:
    body = b"prompt,response\nok,fine\ntoo,many,fields\nbad \xff byte,x\nempty,\nlast,one\n"
    f = write(tmp_path / "bad.csv", body)
    msg = config_error(sources.files, path=str(f), task="generate")
    assert f"{f}: row 2: line 3: expected 2 fields, got 3" in msg and "data.on_bad_rows=skip" in msg
    s = load(path=str(f), on_bad_rows="skip", eval_fraction=0.0)
    assert [e["prompt"] for e in s.train] == ["ok", "last"]
    assert (s.info["num_rows_read"], s.info["num_rows_skipped"]) == (5, 3)
    unclosed = write(tmp_path / "q.csv", 'prompt,response\nq1,"never closed\nq2,a2\n')
    assert "row 1: line 3: malformed CSV" in config_error(sources.files, path=str(unclosed), task="generate")
    assert "row 1: line 2: bytes that are not valid UTF-8" in config_error(
        sources.files, path=str(write(tmp_path / "u.csv", b"prompt,response\n\xfe,x\n")), task="generate"
    )


def test_bad_jsonl_lines_and_labels(tmp_path: Path) -> None:
    f = write(
        tmp_path / "b.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n[1, 2]\n{"text": "c", "label": 0}\n'
    )
    assert "row 2: line 2: invalid JSON" in config_error(sources.files, path=str(f), task="classify")
    s = sources.files(path=str(f), task="classify", on_bad_rows="skip")
    assert len(s.train) == 2 and s.info["num_rows_skipped"] == 2
    g = write(tmp_path / "s.tsv", "sentence\tlabel\nfine\t1\nodd\t2\n")
    assert "row 2: label '2' is not one of" in config_error(sources.sst2, path=str(g))
    assert "data.on_bad_rows=maybe" in config_error(
        sources.files, path=str(g), task="classify", on_bad_rows="maybe"
    )


def test_hub_unreachable_says_pass_data_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so the id cannot name a local folder
    msg = config_error(sources.banking77, path=None, hub_id="fedtune-tests/no-such-dataset")
    assert (
        msg.startswith("data.hub_id=fedtune-tests/no-such-dataset: cannot reach the hub")
        and "data.path=" in msg
    )


def test_files_config_errors(tmp_path: Path) -> None:
    assert "data=files needs data.path" in config_error(load)
    f = str(write(tmp_path / "d.csv", "prompt,response\nq,a\n"))
    assert "data.task=regress" in config_error(sources.files, path=f, task="regress")
    assert "data.columns.answer: unknown key" in config_error(
        sources.files, path=f, task="generate", columns={"answer": "a"}
    )
    b = str(write(tmp_path / "b.csv", "text,category\nhi,greet\nbye,leave\n"))
    assert "data=banking77 yields classify" in config_error(load, "banking77", path=b, task="generate")


# -- hold-out and subsampling -----------------------------------------------------------------


def rows_file(tmp_path: Path, n: int = 100) -> str:
    return str(
        write(
            tmp_path / "r.jsonl",
            "".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(n)),
        )
    )


def test_eval_fraction_holdout_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    path = rows_file(tmp_path)
    a, b, c = load(path=path), load(path=path), load(path=path, seed=1)
    assert (len(a.train), len(a.eval)) == (90, 10) and a.eval == b.eval and a.eval != c.eval
    assert sorted(e["prompt"] for e in a.train + a.eval) == sorted(f"p{i}" for i in range(100))
    assert "eval_fraction=1.0" in config_error(load, path=path, eval_fraction=1.0)


def test_max_samples_are_seeded_and_independent(tmp_path: Path) -> None:
    path = rows_file(tmp_path)
    small = load(path=path, max_train_samples=20, max_eval_samples=5)
    assert (len(small.train), len(small.eval)) == (20, 5)
    assert small.eval == load(path=path, max_eval_samples=5).eval  # same eval whatever max_train_samples
    assert small.train == load(path=path, max_train_samples=20).train
    assert "max_train_samples=-1" in config_error(load, path=path, max_train_samples=-1)


# -- real data (../shared/data) ---------------------------------------------------------------


@needs_shared
def test_real_banking77() -> None:
    s = load("banking77", path=str(SHARED / "banking77"))
    # 7 test texts also in train (up to whitespace) are dropped from eval
    assert (len(s.train), len(s.eval), len(s.label_names)) == (10003, 3073, 77)
    assert s.info["num_eval_overlap_dropped"] == 7
    # the hub's ClassLabel order: case-insensitive sort of the names
    assert (
        s.label_names[:2] == ["activate_my_card", "age_limit"]
        and s.label_names[51] == "Refund_not_showing_up"
    )
    assert s.train[0] == {
        "text": "I am still waiting on my card?",
        "label": s.label_names.index("card_arrival"),
    }


@needs_shared
def test_real_counsel_chat() -> None:
    s = load("counsel_chat", path=str(SHARED / "counsel_chat" / "20200325_counsel_chat.csv"))
    # val+test has 290 rows; 40 repeat a training answer to the same text and are dropped
    assert s.info["num_rows_read"] == 2129 and (len(s.train), len(s.eval)) == (1839, 250)
    assert s.info["num_eval_overlap_dropped"] == 40
    assert len({e["topic"] for e in s.train + s.eval}) == 31
    assert not {e["question_id"] for e in s.train} & {e["question_id"] for e in s.eval}


@needs_shared
def test_real_sst2_is_fast() -> None:
    start = time.perf_counter()
    s = load("sst2", path=str(SHARED / "glue" / "SST-2"))
    assert time.perf_counter() - start < 2.0
    assert (len(s.train), len(s.eval)) == (67349, 872) and {e["label"] for e in s.eval} == {0, 1}


@needs_shared
def test_real_alpaca_seed_tasks() -> None:
    s = load("alpaca", path=str(SHARED / "alpaca_seed_tasks" / "seed_tasks.jsonl"))
    assert (len(s.train), len(s.eval)) == (157, 18)  # 175 tasks x 1 instance, 10% held out
    assert sum("\n\n" in e["prompt"] for e in s.train + s.eval) == 125  # tasks with a non-empty input
