"""What evaluation sees: eval disjoint from train, seeded (stratified) subsamples, honest BLEU, template coverage."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from fedtune.data import sources
from fedtune.data.format import PLAIN_TEMPLATE, prompt_ids
from fedtune.data.schema import Splits
from fedtune.data.synthetic import make_splits
from fedtune.data.tasks import corpus, prepare
from fedtune.models.tokenizer import word_level
from fedtune.train import evaluate as ev

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
REAL = {
    "banking77": SHARED / "banking77",
    "sst2": SHARED / "glue" / "SST-2",
    "counsel_chat": SHARED / "counsel_chat" / "20200325_counsel_chat.csv",
    "alpaca": SHARED / "alpaca_seed_tasks" / "seed_tasks.jsonl",
}


def data_cfg(name: str, **overrides: Any) -> Any:
    node = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    root = OmegaConf.create({"data": node})
    for key, value in overrides.items():
        OmegaConf.update(root, f"data.{key}", value, merge=False)
    return root.data


def load(name: str, **overrides: Any) -> Splits:
    if name in REAL:
        if not REAL[name].exists():
            pytest.skip(f"real data {REAL[name]} is absent")
        overrides.setdefault("path", str(REAL[name]))
    return sources.load_splits(data_cfg(name, **overrides))


def key(ex: dict) -> tuple:
    fields = ("prompt", "response") if "prompt" in ex else ("text", "text_pair")
    return tuple(" ".join(str(ex.get(f) or "").split()) for f in fields)


# -- eval is disjoint from train ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["synthetic", "banking77", "sst2", "counsel_chat", "alpaca"])
def test_eval_disjoint_from_train_for_every_data_config(name: str) -> None:
    s = load(name)  # full splits
    train = {key(e) for e in s.train}
    assert s.eval and not [e for e in s.eval if key(e) in train]
    assert isinstance(s.info["num_eval_overlap_dropped"], int)


def test_every_data_config_is_covered() -> None:
    names = {p.stem for p in (ROOT / "conf" / "data").glob("*.yaml")}
    assert names == {"synthetic", "files", *REAL}  # files: see test_overlapping_eval_rows_are_dropped_and_counted


def test_synthetic_examples_are_distinct_and_eval_keeps_its_size() -> None:
    for seed in (0, 1, 2):
        raw = make_splits(seed=seed)
        keys = [key(e) for e in raw.train + raw.eval]
        assert (len(raw.train), len(raw.eval)) == (600, 60) and len(set(keys)) == 660
    s = load("synthetic")
    assert (len(s.train), len(s.eval), s.info["num_eval_overlap_dropped"]) == (600, 60, 0)
    big = make_splits(num_train=3000, num_eval=60)  # more than some topics hold: train repeats, eval never
    assert len(big.eval) == 60 and not {key(e) for e in big.eval} & {key(e) for e in big.train}


def test_overlapping_eval_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(
        '{"prompt": "p1", "response": "r1"}\n{"prompt": "p2", "response": "r2"}\n'
    )
    (tmp_path / "validation.jsonl").write_text(
        '{"prompt": "p1", "response": "r1"}\n{"prompt": "p2 ", "response": " r2"}\n'
        '{"prompt": "p1", "response": "other"}\n'
    )
    s = sources.load_splits(data_cfg("files", path=str(tmp_path)))
    assert s.eval == [{"prompt": "p1", "response": "other"}] and s.info["num_eval_overlap_dropped"] == 2
    (tmp_path / "c.csv").write_text("text,label\nsame,a\nsame,b\nx,a\ny,b\nz,a\nw,b\n")
    for seed in range(4):  # held-out eval: never a text that stays in train
        c = sources.load_splits(data_cfg("files", path=str(tmp_path / "c.csv"), task="classify",
                                         eval_fraction=0.5, seed=seed))
        assert not {key(e) for e in c.eval} & {key(e) for e in c.train}


# -- seeded, stratified subsamples ---------------------------------------------------------------


def label_counts(rows: list[dict]) -> collections.Counter:
    return collections.Counter(e["label"] for e in rows)


def assert_stratified(sample: list[dict], full: list[dict]) -> None:
    got, whole = label_counts(sample), label_counts(full)
    for label, count in whole.items():
        assert abs(got[label] - len(sample) * count / len(full)) < 1, (label, got[label])


@pytest.fixture(scope="module")
def banking77_worlds() -> list[Any]:
    """The run's own path (build_world) with eval.max_samples=150, for two run seeds and strategies."""
    if not REAL["banking77"].exists():
        pytest.skip("real data banking77 is absent")
    import torch

    from fedtune.config import compose_config
    from fedtune.world import build_world

    worlds = []
    for extra in (["seed=0"], ["seed=7", "strategy=gradualdiff"]):
        cfg = compose_config([
            "data=banking77", f"data.path={REAL['banking77']}", "data.max_train_samples=300", "eval.max_samples=150",
            "logger=none", "threads=1", *extra,
        ])
        worlds.append(build_world(cfg, device=torch.device("cpu")))
    return worlds


def test_eval_max_samples_is_stratified_and_fixed_across_run_seeds(banking77_worlds: list[Any]) -> None:
    a, b = banking77_worlds
    examples = a.task.eval_examples
    assert len(examples) == 150 and len(label_counts(examples)) == 77  # every class (first 150 rows: 4)
    assert_stratified(examples, a.splits.eval)
    assert examples == b.task.eval_examples  # the draw depends on data.seed only
    other = prepare(a.splits, a.tokenizer, classify_with="generate", max_seq_len=128, max_eval_samples=150)
    assert other.eval_examples == examples


def test_data_max_samples_are_stratified() -> None:
    s = load("banking77", max_train_samples=770, max_eval_samples=154)
    full = load("banking77")
    assert len(s.eval) == 154 and len(label_counts(s.eval)) == 77 and len(label_counts(s.train)) == 77
    assert_stratified(s.eval, full.eval)
    assert_stratified(s.train, full.train)
    assert s.eval == load("banking77", max_eval_samples=154).eval  # independent of max_train_samples
    assert s.eval != load("banking77", max_eval_samples=154, seed=1).eval


def test_stratified_subsample_on_label_sorted_rows() -> None:
    rows = [{"text": f"t{i}", "label": i // 30} for i in range(300)]  # 10 labels, sorted
    for seed in range(3):
        sample = sources.subsample(rows, 25, seed=seed, purpose="x")
        assert len(sample) == 25 and len(label_counts(sample)) == 10
        assert_stratified(sample, rows)
        assert sample == sources.subsample(rows, 25, seed=seed, purpose="x")
        assert sample == [r for r in rows if r in sample]  # input order kept


def test_bleu_prompts_are_a_seeded_draw_not_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = make_splits(num_train=60, num_eval=40)
    tok = word_level(texts=corpus(splits))
    task = prepare(splits, tok, classify_with="generate", max_seq_len=64)
    seen: list[list[str]] = []
    monkeypatch.setattr(ev, "eval_loss", lambda *a, **k: {"loss": 1.0, "ppl": 2.7})
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, **k: seen.append(prompts) or ["x"] * len(prompts))
    kw = dict(batch_size=4, bleu_samples=8, max_new_tokens=4, device="cpu")
    ev.evaluate(task, None, tok, **kw)
    ev.evaluate(task, None, tok, **kw)
    first = [e["prompt"] for e in splits.eval[:8]]
    assert len(seen[0]) == 8 and seen[0] != first and seen[0] == seen[1]
    assert len({e["topic"] for e in ev.bleu_examples(task, 8)}) > 1
    splits.info["seed"] = 1  # another data seed: another draw
    assert ev.bleu_examples(prepare(splits, tok, classify_with="generate", max_seq_len=64), 8) != ev.bleu_examples(
        task, 8)


# -- BLEU against raw references; the template is in the vocabulary ------------------------------


def test_bleu_reference_keeps_out_of_vocabulary_words(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = Splits(train=[{"prompt": "say it", "response": "the cat sat on a mat today"}],
                    eval=[{"prompt": "say it", "response": "the zebra sat on a mat today"}], task="generate")
    tok = word_level(texts=corpus(splits))
    assert tok.unk_token_id in tok("zebra", add_special_tokens=False)["input_ids"]
    task = prepare(splits, tok, classify_with="generate", max_seq_len=64)
    monkeypatch.setattr(ev, "eval_loss", lambda *a, **k: {"loss": 1.0, "ppl": 2.7})
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, **k: ["the sat on a mat today"] * len(prompts))
    bleu = ev.evaluate(task, None, tok, batch_size=4, bleu_samples=1, max_new_tokens=8, device="cpu")["bleu"]
    assert bleu < 100  # the old code scored the reference as the tokenizer gave it back: 100
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, **k: ["the zebra sat on a mat today"] * len(prompts))
    assert ev.evaluate(task, None, tok, batch_size=4, bleu_samples=1, max_new_tokens=8, device="cpu")["bleu"] > 99.99


def test_bleu_of_a_perfect_word_level_generation_is_100(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = "I'm sure the top-up failed, sorry; it costs 3.50."
    splits = Splits(train=[{"prompt": "why?", "response": reference}], eval=[{"prompt": "why?", "response": reference}],
                    task="generate")
    tok = word_level(texts=corpus(splits))
    task = prepare(splits, tok, classify_with="generate", max_seq_len=64)
    decoded = tok.decode(tok(reference, add_special_tokens=False)["input_ids"])  # "I ' m sure the top - up ..."
    assert decoded != reference
    monkeypatch.setattr(ev, "eval_loss", lambda *a, **k: {"loss": 1.0, "ppl": 2.7})
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, **k: [decoded] * len(prompts))
    assert ev.evaluate(task, None, tok, batch_size=4, bleu_samples=1, max_new_tokens=32, device="cpu")["bleu"] > 99.99


def test_generated_label_names_still_match(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["card_arrival", "top-up failed", "Refund_not_showing_up"]
    splits = Splits(train=[{"text": f"q{i}", "label": i} for i in range(3)],
                    eval=[{"text": f"e{i}", "label": i} for i in range(3)], task="classify", label_names=names)
    tok = word_level(texts=corpus(splits))
    task = prepare(splits, tok, classify_with="generate", max_seq_len=64)
    decoded = [tok.decode(tok(n, add_special_tokens=False)["input_ids"]) for n in names]  # "top - up failed"
    monkeypatch.setattr(ev, "eval_loss", lambda *a, **k: {"loss": 1.0, "ppl": 2.7})
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, **k: decoded)
    out = ev.evaluate(task, None, tok, batch_size=4, bleu_samples=4, max_new_tokens=8, device="cpu")
    assert out["accuracy"] == 1.0 and "bleu" not in out


@pytest.mark.parametrize("max_vocab", [8000, 40])
def test_prompt_template_words_are_in_the_vocabulary(max_vocab: int) -> None:
    splits = make_splits(num_train=120, num_eval=12)
    tok = word_level(texts=corpus(splits), max_vocab=max_vocab)
    vocab = tok.get_vocab()
    for word in ("Instruction", "Response", ":"):
        assert word in vocab, word
    template_ids = tok(PLAIN_TEMPLATE.format(prompt=""), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in template_ids
    if max_vocab == 8000:
        assert tok.unk_token_id not in prompt_ids(tok, splits.train[0]["prompt"])
