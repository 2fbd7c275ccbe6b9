"""Evaluation of a model on the global held-out split: token loss, perplexity, greedy BLEU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerBase

from fedtune.data.format import IGNORE_INDEX, Tokenized, collate, prompt_ids
from fedtune.data.schema import Example
from fedtune.data.sources import subsample
from fedtune.data.tasks import TaskData
from fedtune.metrics.classification import accuracy, macro_f1
from fedtune.metrics.text import corpus_bleu, perplexity


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module, data: Tokenized, *, batch_size: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """Token-weighted mean NLL over response tokens, and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += nll.item()
        count += int((labels != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": perplexity(loss)}


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Batched greedy generation, left-padded, stopping at EOS; returns the decoded continuations."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        # generate is a transformers/peft method; nn.Module types unknown attributes as Tensor | Module
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,  # the model's config says False: training forwards need no cache
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


def _normalize(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """Text as the tokenizer would give it back (word-level tokenizers re-space punctuation).

    For matching generated label names only: BLEU references stay raw text (a reference passed through
    a word-level tokenizer loses its out-of-vocabulary words, which inflates BLEU).
    """
    # decode of one sequence is a str (transformers annotates str | list[str] for batches too)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = cast(str, tokenizer.decode(ids, skip_special_tokens=True))
    return decoded.strip()


def bleu_reference(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """A BLEU reference: the raw text, every word kept (never mapped through the vocabulary).

    A word-level tokenizer decodes its words joined by single spaces ("don ' t", "top - up"), so its
    references are split the same way by its pre-tokenizer (out-of-vocabulary words stay), else a
    perfect generation could not score 100; other tokenizers decode to plain text and compare as is.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and isinstance(backend.model, tokenizer_models.WordLevel) and backend.pre_tokenizer:
        return " ".join(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return text.strip()


def bleu_examples(task: TaskData, n: int) -> list[Example]:
    """The eval examples BLEU generates for: a random draw of ``n`` seeded by the data seed alone."""
    return subsample(task.eval_examples, n, seed=task.seed, purpose="eval.bleu_samples")


def majority_accuracy(task: TaskData) -> tuple[float, str] | None:
    """(accuracy of always answering the eval set's most frequent class, that class's name); None for
    generation or an empty eval set. What a classifier that learned nothing scores: the floor its
    ``eval/accuracy`` must clear (logged at the start as ``eval/majority_accuracy``)."""
    if task.kind == "generate" or not task.eval_examples:
        return None
    counts = Counter(ex["label"] for ex in task.eval_examples)
    label, count = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))  # ties: the lower index
    name = task.label_names[label] if task.label_names else str(label)
    return count / len(task.eval_examples), name


def below_majority(final: Mapping[str, Any], majority: tuple[float, str] | None) -> str | None:
    """The end-of-run warning when the final ``eval/accuracy`` is not above the majority-class rate."""
    accuracy = final.get("eval/accuracy")
    if majority is None or accuracy is None or accuracy > majority[0]:
        return None
    return (f"final eval/accuracy {accuracy:.4f} is not above the eval set's majority-class accuracy "
            f"{majority[0]:.4f} (always answering {majority[1]!r}): this run learned nothing beyond the "
            "label frequencies")


@torch.no_grad()
def eval_head(
    model: torch.nn.Module, data: Tokenized, *, batch_size: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """Cross-entropy, accuracy and macro-F1 of a sequence-classification head."""
    model.eval()
    total, preds, golds = 0.0, [], []
    for start in range(0, len(data), batch_size):
        batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        golds += batch["labels"].tolist()
    loss = total / max(len(golds), 1)
    return {"loss": loss, "accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds)}


def evaluate(
    task: TaskData,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    bleu_samples: int,
    max_new_tokens: int,
    device: torch.device,
) -> dict[str, float]:
    """The task's eval metrics for the model's current trainable state."""
    pad = tokenizer.pad_token_id
    if task.kind == "classify_head":
        return eval_head(model, task.eval, batch_size=batch_size, pad_id=pad, device=device)
    metrics = eval_loss(model, task.eval, batch_size=batch_size, pad_id=pad, device=device)
    examples = task.eval_examples
    if task.kind == "classify_generate":
        assert task.label_names is not None
        names = {_normalize(tokenizer, n): i for i, n in enumerate(task.label_names)}
        hyps = generate(model, tokenizer, [ex["prompt"] for ex in examples],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
        preds = [names.get(h.strip(), -1) for h in hyps]
        golds = [ex["label"] for ex in examples]
        metrics.update(accuracy=accuracy(preds, golds), macro_f1=macro_f1(preds, golds))
    elif bleu_samples > 0:
        chosen = bleu_examples(task, bleu_samples)
        hyps = generate(model, tokenizer, [ex["prompt"] for ex in chosen],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
        metrics["bleu"] = corpus_bleu(hyps, [bleu_reference(tokenizer, ex["response"]) for ex in chosen])
    return metrics
