"""From a dataset in the common schema to what training and evaluation consume.

Three task kinds:
- ``generate``: instruction -> response; loss on response tokens; eval loss, ppl and BLEU.
- ``classify`` with ``classify_with=generate``: the label NAME is the response; accuracy and
  macro-F1 by exact match of the greedily generated label.
- ``classify`` with ``classify_with=head``: a sequence-classification head; accuracy and macro-F1
  from the logits.
Tokenization is cached in-process (a Hydra multirun runs its jobs in one process) keyed by the
examples, the tokenizer and max_seq_len.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.format import PLAIN_TEMPLATE, Tokenized, tokenize_generate
from fedtune.data.schema import Example, Splits
from fedtune.data.sources import subsample
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("generate", "classify_generate", "classify_head")
_CACHE: OrderedDict[str, Tokenized] = OrderedDict()
_CACHE_SIZE = 8


@dataclass
class TaskData:
    """Tokenized train/eval data and what evaluation needs to score it."""

    kind: str
    train: Tokenized
    eval: Tokenized
    eval_examples: list[Example]  # generate schema (prompt/response) or classify schema (text/label)
    label_names: list[str] | None = None
    seed: int = 0  # the data seed: evaluation's own draws (BLEU prompts) are seeded by it alone

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.kind == "classify_head" and self.label_names else None


def task_kind(task: str, classify_with: str) -> str:
    if task == "generate":
        return "generate"
    if classify_with not in ("head", "generate"):
        raise ConfigError(f"data.classify_with={classify_with}: choose head or generate")
    return f"classify_{classify_with}"


def classification_text(ex: Example) -> str:
    return ex["text"] if not ex.get("text_pair") else f"{ex['text']}\n{ex['text_pair']}"


def as_generation(examples: list[Example], label_names: list[str]) -> list[Example]:
    """Classification examples as prompt -> label-name pairs (label-as-text training)."""
    return [{**ex, "prompt": classification_text(ex), "response": label_names[ex["label"]]} for ex in examples]


def corpus(splits: Splits) -> list[str]:
    """Texts a tokenizer built from data (the tiny models' word-level one) must cover.

    The plain prompt template (what a tokenizer without a chat template wraps every prompt in) counts
    once per training example, as often as the model sees it, so a vocabulary cap never drops it.
    """
    texts = [t for ex in splits.train for t in (ex.get("prompt"), ex.get("response"), ex.get("text"),
                                                  ex.get("text_pair")) if t]
    template = PLAIN_TEMPLATE.format(prompt="")
    return texts + [template] * max(1, len(splits.train)) + list(splits.label_names or [])


def tokenize_classify(examples: list[Example], tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int) -> Tokenized:
    """Text (+ pair) ids, truncated from the right (counted); the label is a 0-d tensor."""
    ids, labels, truncated = [], [], 0
    for ex in examples:
        tok = tokenizer(classification_text(ex), add_special_tokens=True)["input_ids"]
        if len(tok) > max_seq_len:
            truncated += 1
            tok = tok[:max_seq_len]
        ids.append(torch.tensor(tok, dtype=torch.long))
        labels.append(torch.tensor(ex["label"], dtype=torch.long))
    return Tokenized(input_ids=ids, labels=labels, num_truncated=truncated)


def _fingerprint(kind: str, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([kind, max_seq_len, type(tokenizer).__name__, tokenizer.name_or_path]).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _tokenize(kind: str, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> Tokenized:
    key = _fingerprint(kind, examples, tokenizer, max_seq_len)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    fn = tokenize_classify if kind == "classify_head" else tokenize_generate
    out = fn(examples, tokenizer, max_seq_len=max_seq_len)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def tokenize_like(task: TaskData, examples: list[Example], tokenizer: PreTrainedTokenizerBase, *,
                  max_seq_len: int) -> tuple[Tokenized, list[Example]]:
    """Tokenize more examples of the same dataset the way ``task`` was (e.g. KD's public set)."""
    if task.kind == "classify_generate":
        assert task.label_names is not None
        examples = as_generation(examples, task.label_names)
    return _tokenize(task.kind, examples, tokenizer, max_seq_len), examples


def prepare(
    splits: Splits, tokenizer: PreTrainedTokenizerBase, *, classify_with: str, max_seq_len: int,
    max_eval_samples: int | None = None,
) -> TaskData:
    """Tokenize train and eval for the task kind; truncation counts are logged, not silent.

    ``max_eval_samples`` (``eval.max_samples``) keeps a random draw of eval, stratified by label for
    classification, seeded by the data seed (``splits.info["seed"]``, set by ``load_splits``) alone.
    """
    kind = task_kind(splits.task, classify_with)
    seed = int(splits.info.get("seed", 0))
    train, evals = splits.train, splits.eval
    if max_eval_samples is not None:
        evals = subsample(evals, int(max_eval_samples), seed=seed, purpose="eval.max_samples")
    if kind == "classify_generate":
        assert splits.label_names, "classification data must name its labels"
        train, evals = as_generation(train, splits.label_names), as_generation(evals, splits.label_names)
    data = TaskData(
        kind=kind, train=_tokenize(kind, train, tokenizer, max_seq_len), eval=_tokenize(kind, evals, tokenizer, max_seq_len),
        eval_examples=evals, label_names=splits.label_names, seed=seed,
    )
    for name, tok in (("train", data.train), ("eval", data.eval)):
        if tok.num_truncated:
            log.warning("%d of %d %s examples truncated to local.max_seq_len=%d", tok.num_truncated, len(tok), name,
                        max_seq_len)
    return data
