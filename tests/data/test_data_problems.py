"""Data problems caught, not trained on (issue 13, items 9, 13-18): headerless files, missing labels,
a single class, duplicate columns, which file is eval, the majority-class floor, sentence pairs in
generation prompts, values Hydra's grammar cannot read, and data checks in the sweep pre-check."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from fedtune import cli
from fedtune.data import readers, sources
from fedtune.data.schema import Splits
from fedtune.errors import ConfigError
from fedtune.train.evaluate import below_majority, majority_accuracy

ROOT = Path(__file__).resolve().parents[2]

# A CoLA-shaped file: source, label, original mark, sentence; no header row (GLUE's train.tsv / dev.tsv).
COLA_TRAIN = "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n" \
             "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more we study the verbs.\n"
COLA_DEV = "gj04\t1\t\tThe professor talked us into a stupor.\ngj04\t0\t*\tThe horse kicked me black.\n"


def data_cfg(**overrides: Any) -> Any:
    node = OmegaConf.load(ROOT / "conf" / "data" / "files.yaml")
    root = OmegaConf.create({"data": node})
    for key, value in overrides.items():
        OmegaConf.update(root, f"data.{key}", value, merge=False)
    return root.data


def load(**overrides: Any) -> Splits:
    return sources.load_splits(data_cfg(**overrides))


def one_line_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cola(tmp_path: Path) -> Path:
    folder = tmp_path / "CoLA"
    folder.mkdir()
    write(folder / "train.tsv", COLA_TRAIN)
    write(folder / "dev.tsv", COLA_DEV)
    return folder


def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fedtune", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, needle: str, tmp_path: Path) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fedtune: error: ") and needle in err, err
    assert not list(tmp_path.rglob("metrics.jsonl"))  # no job ran


# -- 13: headerless files, columns by 0-based position -----------------------------------------------


def test_headerless_tsv_columns_by_position(tmp_path: Path) -> None:
    folder = cola(tmp_path)
    s = load(path=str(folder), task="classify", header=False, columns={"text": 3, "label": 1})
    # every row is data: the first row is not eaten as a header
    assert [e["text"] for e in s.train] == [line.split("\t")[3] for line in COLA_TRAIN.splitlines()]
    assert s.label_names == ["0", "1"] and [e["label"] for e in s.train] == [1, 0, 1, 0]
    assert [e["text"] for e in s.eval] == ["The professor talked us into a stupor.", "The horse kicked me black."]
    assert s.train[1]["0"] == "gj04" and s.train[1]["2"] == "*"  # other columns kept, named by position
    # positions may also come as digit strings (a quoted override)
    assert load(path=str(folder), task="classify", header=False, columns={"text": "3", "label": "1"}).train == s.train


def test_headerless_errors_are_one_line_naming_the_key(tmp_path: Path) -> None:
    folder = cola(tmp_path)
    msg = one_line_error(load, path=str(folder), task="classify", header=False, columns={"text": 7, "label": 1})
    assert msg.startswith("data.columns.text=7: no column at 0-based position 7;") and "4 columns (positions 0-3)" in msg
    msg = one_line_error(load, path=str(folder), task="classify", header=False, columns={"text": "sentence", "label": 1})
    assert msg.startswith("data.columns.text=sentence: with data.header=false a column is its 0-based position")
    assert "data.columns.label=-1" in one_line_error(
        load, path=str(folder), task="classify", header=False, columns={"text": 3, "label": -1})
    msg = one_line_error(load, path=str(folder), task="classify", header=False, columns={"text": 3})
    assert msg.startswith("data.columns.label: with data.header=false")
    jsonl = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n')
    assert "only .csv/.tsv files can lack a header row" in one_line_error(
        load, path=str(jsonl), task="classify", header=False, columns={"text": 0, "label": 1})
    assert "data.header=maybe: must be true or false" in one_line_error(load, path=str(folder), header="maybe")
    # a headerless file read with a header: the message says how to read it
    msg = one_line_error(load, path=str(folder), task="classify", columns={"text": "sentence", "label": "label"})
    assert "no column 'sentence'" in msg and "pass data.header=false" in msg


def test_headerless_through_the_cli_precheck(monkeypatch, tmp_path, capsys) -> None:
    folder = cola(tmp_path)
    code, err = run_cli(monkeypatch, tmp_path, capsys, "data=files", "data.task=classify", f"data.path={folder}",
                        "data.header=false", "data.columns.text=9", "data.columns.label=1")
    assert_one_line(code, err, "data.columns.text=9: no column at 0-based position 9", tmp_path)


# -- 14: missing labels, a single class, duplicate column names --------------------------------------


def test_nan_and_empty_labels_are_bad_rows(tmp_path: Path) -> None:
    f = write(tmp_path / "l.csv", "text,label\na,pos\nb,NaN\nc,nan\nd,neg\ne,\nf, NAN \n")
    s = sources.files(path=str(f), task="classify", on_bad_rows="skip")
    assert s.label_names == ["neg", "pos"]  # never a class named "NaN"
    assert [e["text"] for e in s.train] == ["a", "d"] and s.info["num_rows_skipped"] == 4
    msg = one_line_error(sources.files, path=str(f), task="classify")
    assert msg == f"{f}: row 2: missing label 'NaN' in 'label'; fix the file or pass data.on_bad_rows=skip"
    # a text that reads "nan" is still a text
    g = write(tmp_path / "t.csv", "text,label\nnan,pos\nx,neg\n")
    assert sources.files(path=str(g), task="classify").train[0]["text"] == "nan"


def test_single_class_label_column_is_one_line(tmp_path: Path) -> None:
    f = write(tmp_path / "one.csv", "review,stars\ngood,5\nfine,5\ngreat,5\n")
    msg = one_line_error(sources.files, path=str(f), task="classify", columns={"text": "review", "label": "stars"})
    assert msg == (f"{f}: data.columns.label=stars has a single class ('5') in all 3 training rows; "
                   "classification needs at least 2 (check the label column)")
    # after skipping bad rows, too (the NaN rows would have made a second class)
    g = write(tmp_path / "nan.csv", "text,label\na,pos\nb,NaN\n")
    assert "single class ('pos')" in one_line_error(sources.files, path=str(g), task="classify", on_bad_rows="skip")
    h = write(tmp_path / "s.tsv", "sentence\tlabel\nok\t1\nfine\t1\n")  # fixed label names (SST-2)
    assert "column 'label' has a single class ('positive')" in one_line_error(sources.sst2, path=str(h))


def test_duplicate_column_names_are_one_line(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", "text,label,text,label,x\na,1,b,2,z\n")
    msg = one_line_error(sources.files, path=str(f), task="classify")
    assert msg == (f"{f}: duplicate column names 'label', 'text' in the header (rows would keep only the last "
                   "one's values); rename them")
    assert one_line_error(readers.file_columns, f, where="d").startswith("d: duplicate column names 'label', 'text'")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["q", "q"]), tmp_path / "d.parquet")
    assert "duplicate column names 'q'" in one_line_error(sources.files, path=str(tmp_path / "d.parquet"),
                                                          task="generate")


# -- 15: which file became the eval split ------------------------------------------------------------


def test_eval_from_names_the_file_or_the_holdout(tmp_path: Path) -> None:
    folder = cola(tmp_path)
    s = load(path=str(folder), task="classify", header=False, columns={"text": 3, "label": 1})
    assert s.info["eval_from"] == str(folder / "dev.tsv")
    rows = "".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(20))
    f = write(tmp_path / "r.jsonl", rows)
    assert load(path=str(f), seed=3).info["eval_from"] == (
        f"held out from {f}: data.eval_fraction=0.1, data.seed=3")


# -- 16: the majority-class floor ---------------------------------------------------------------------


def test_majority_accuracy_and_the_warning_rule() -> None:
    from fedtune.data.format import Tokenized
    from fedtune.data.tasks import TaskData

    empty = Tokenized(input_ids=[], labels=[])
    task = TaskData(kind="classify_head", train=empty, eval=empty, label_names=["neg", "pos", "mid"],
                    eval_examples=[{"text": "t", "label": lab} for lab in (1, 1, 1, 0, 2, 0)])
    assert majority_accuracy(task) == (0.5, "pos")
    tie = TaskData(kind="classify_generate", train=empty, eval=empty, label_names=["a", "b"],
                   eval_examples=[{"label": 1}, {"label": 0}])
    assert majority_accuracy(tie) == (0.5, "a")
    assert majority_accuracy(TaskData(kind="generate", train=empty, eval=empty, eval_examples=[{}])) is None
    assert below_majority({"eval/accuracy": 0.5}, (0.5, "pos")) is not None  # equal is not above
    assert "always answering 'pos'" in below_majority({"eval/accuracy": 0.2}, (0.5, "pos"))
    assert below_majority({"eval/accuracy": 0.51}, (0.5, "pos")) is None
    assert below_majority({"eval/loss": 1.0}, None) is None


def test_run_logs_majority_accuracy_and_eval_file_and_warns(run_fedtune, tmp_path, caplog) -> None:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    train = [f"{a} {b} {i}" for i, (a, b) in enumerate((a, b) for a in words for b in words)][:24]
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.csv", "text,label\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(train)))
    write(data / "dev.csv", "text,label\n" + "".join(f"dev {i},{'pos' if i < 6 else 'neg'}\n" for i in range(8)))
    caplog.set_level(logging.INFO)
    summary, out = run_fedtune(
        "logger=none", "num_rounds=1", "num_clients=2", "local.max_steps=1", "local.batch_size=4",
        "eval.max_new_tokens=2", "threads=1", "data=files", "data.task=classify", f"data.path={data}", fast=False)
    assert summary["eval/majority_accuracy"] == 0.75
    saved = json.loads((out / "summary.json").read_text())
    assert saved["eval/majority_accuracy"] == 0.75 and saved["data/eval_from"] == str(data / "dev.csv")
    assert any(f"from {data / 'dev.csv'}; majority-class accuracy 0.7500 (always 'pos')" in r.message
               for r in caplog.records)
    assert saved["final"]["eval/accuracy"] <= 0.75  # one step of a tiny model learns nothing...
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("is not above the eval set's majority-class accuracy 0.7500" in w for w in warnings)  # ...and says so


# -- 17: sentence pairs in generation prompts ---------------------------------------------------------


def test_generate_with_text_pair_joins_the_prompt(tmp_path: Path, caplog) -> None:
    f = write(tmp_path / "qa.csv", "question,context,answer\nwho?,Ann met Bo.,Ann\nwhere?,In Rome.,Rome\n")
    caplog.set_level(logging.WARNING)
    s = sources.files(path=str(f), task="generate",
                      columns={"prompt": "question", "text_pair": "context", "response": "answer"})
    assert s.train == [{"prompt": "who?\nAnn met Bo.", "response": "Ann"},
                       {"prompt": "where?\nIn Rome.", "response": "Rome"}]
    assert not [r for r in caplog.records if "unused" in r.message]
    # generation joins a pair only when data.columns.text_pair is set (a column of that name is not enough)
    g = write(tmp_path / "g.csv", "prompt,response,text_pair\np,r,t\n")
    assert sources.files(path=str(g), task="generate").train == [{"prompt": "p", "response": "r"}]
    h = write(tmp_path / "h.tsv", "who?\tAnn met Bo.\tAnn\n")  # positions work for pairs too
    assert sources.files(path=str(h), task="generate", header=False,
                         columns={"prompt": 0, "text_pair": 1, "response": 2}).train[0]["prompt"] == "who?\nAnn met Bo."


# -- 18: values Hydra's override grammar cannot read ---------------------------------------------------


@pytest.mark.parametrize(("arg", "needle"), [
    ("data.path=~/x.csv", """data.path=~/x.csv: Hydra's override grammar cannot read this value at '~'; quote it """
                          """for Hydra, inside shell quotes: 'data.path="~/x.csv"'"""),
    ("data.columns.text=my #1 col", """at '#'; quote it for Hydra, inside shell quotes: 'data.columns.text="my #1 col"'"""),
])
def test_unparsable_override_says_how_to_quote(monkeypatch, tmp_path, capsys, arg, needle) -> None:
    code, err = run_cli(monkeypatch, tmp_path, capsys, "data=files", arg)
    assert_one_line(code, err, needle, tmp_path)
    assert "LexerNoViableAltException" not in err


def test_the_quoted_form_gets_through(monkeypatch, tmp_path, capsys) -> None:
    code, err = run_cli(monkeypatch, tmp_path, capsys, "data=files", 'data.path="~/no/such/fedtune.csv"')
    assert_one_line(code, err, "data.path=~/no/such/fedtune.csv: no such file or folder", tmp_path)


def test_unparsable_sweep_value_quotes_each_value() -> None:
    err = "LexerNoViableAltException: data.path=a.csv,~/b.csv\n" + " " * (27 + 16) + "^\nSee ..."
    line = cli.unparsable_line("data.path=a.csv,~/b.csv", err, multirun=True)
    assert line.endswith("""at '~'; quote it for Hydra, inside shell quotes: 'data.path="a.csv","~/b.csv"'""")


# -- 9: data checks in the pre-check, for every job of a sweep, before any job runs -------------------


SWEEP_FAST = ["logger=none", "num_rounds=1", "num_clients=2", "local.max_steps=1", "local.batch_size=4",
              "eval.bleu_samples=0", "eval.max_new_tokens=2", "threads=1"]


def qa_file(tmp_path: Path) -> Path:
    return write(tmp_path / "qa.csv", "q,a\n" + "".join(f"question {i},answer {i}\n" for i in range(12)))


def test_sweep_missing_file_stops_before_any_job(monkeypatch, tmp_path, capsys) -> None:
    good = qa_file(tmp_path)
    code, err = run_cli(monkeypatch, tmp_path, capsys, "-m", *SWEEP_FAST, "data=files", "data.columns.prompt=q",
                        "data.columns.response=a", f"data.path={good},{tmp_path / 'missing.csv'}")
    assert_one_line(code, err, f"data.path={tmp_path / 'missing.csv'}: no such file or folder", tmp_path)


def test_sweep_missing_column_stops_before_any_job(monkeypatch, tmp_path, capsys) -> None:
    good = qa_file(tmp_path)
    code, err = run_cli(monkeypatch, tmp_path, capsys, "-m", *SWEEP_FAST, "data=files", f"data.path={good}",
                        "data.columns.prompt=q", "data.columns.response=a,answer")
    assert_one_line(code, err, f"{good}: no column 'answer' (data.columns.response); available: 'q', 'a'", tmp_path)


def test_check_data_reads_only_the_header(tmp_path: Path, monkeypatch) -> None:
    # row 2 is broken (an unclosed quote swallows the rest): loading fails, the pre-check does not read it
    f = write(tmp_path / "big.csv", 'q,a\nfine,row\n"never closed,x\n' + "more,rows\n" * 1000)
    sources.check_data(data_cfg(path=str(f), columns={"prompt": "q", "response": "a"}))
    assert "malformed CSV" in one_line_error(load, path=str(f), columns={"prompt": "q", "response": "a"})
    assert "no column 'z'" in one_line_error(
        sources.check_data, data_cfg(path=str(f), columns={"prompt": "q", "response": "z"}))
    assert "data=files needs data.path" in one_line_error(sources.check_data, data_cfg())
    # the synthetic default reads nothing at all
    synthetic = OmegaConf.create({"data": OmegaConf.load(ROOT / "conf" / "data" / "synthetic.yaml")}).data
    monkeypatch.setattr(readers, "data_files", lambda *a, **k: pytest.fail("read a file for synthetic data"))
    sources.check_data(synthetic)
