"""Turn examples into token ids: prompt formatting, response-only loss masks, truncation counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from fedtune.data.schema import Example
from fedtune.errors import ConfigError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "Instruction : {prompt}\nResponse :"


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The model's chat template when it has one, else a plain instruction template."""
    if getattr(tokenizer, "chat_template", None):
        # tokenize=False returns the text (transformers annotates every return form together)
        return cast(str, tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        ))
    return PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids a generation starts from (BOS + formatted prompt)."""
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and not getattr(tokenizer, "chat_template", None):
        ids = [bos, *ids]
    return ids


# Largest padded copy (elements a tensor) :meth:`Tokenized.padded` keeps: 64 MB of int64 ids
PADDED_MAX_ELEMENTS = 8 * 2**20


@dataclass(frozen=True)
class Padded:
    """Every example right-padded to the longest: what :func:`collate` slices its batches from."""

    input_ids: torch.Tensor  # (N, L) padded with the pad id
    labels: torch.Tensor  # (N, L') padded with IGNORE_INDEX, or (N,) class labels
    lengths: torch.Tensor  # (N,) tokens of each example
    label_lengths: torch.Tensor | None  # (N,) when a label row's length differs from its input's


@dataclass
class Tokenized:
    """Per-example token ids and labels (prompt positions masked with -100).

    The rows are not changed after tokenization: :meth:`padded` keeps a padded copy of them.
    """

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    num_truncated: int = 0
    _padded: dict[int, Padded | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    def padded(self, pad_id: int) -> Padded | None:
        """All rows padded once (per pad id), or None when that copy would be larger than
        :data:`PADDED_MAX_ELEMENTS` or twice the tokens (long-tailed lengths): batches are then
        padded one by one."""
        if pad_id not in self._padded:
            self._padded[pad_id] = _pad_all(self, pad_id)
        return self._padded[pad_id]


def tokenize_generate(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int
) -> Tokenized:
    """Tokenize prompt/response pairs; the loss sees response tokens (and EOS) only.

    Too-long examples lose the left of the prompt first (keeping at least half the window for
    it), then the end of the response; each one cut is counted in ``num_truncated``.
    """
    input_ids, labels, truncated = [], [], 0
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no end-of-sequence token: it cannot train generation "
                          "(use data.classify_with=head, or a causal LM's tokenizer)")
    for ex in examples:
        p = prompt_ids(tokenizer, ex["prompt"])
        r = tokenizer(" " + ex["response"], add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(r) > max_seq_len:
            truncated += 1
            keep_p = max(max_seq_len - len(r), max_seq_len // 2)
            p = p[-keep_p:] if keep_p > 0 else []
            r = r[: max_seq_len - len(p)]
        input_ids.append(torch.tensor(p + r, dtype=torch.long))
        labels.append(torch.tensor([IGNORE_INDEX] * len(p) + r, dtype=torch.long))
    return Tokenized(input_ids=input_ids, labels=labels, num_truncated=truncated)


def _pad_all(tok: Tokenized, pad_id: int) -> Padded | None:
    if not len(tok):
        return None
    lengths = torch.tensor([len(r) for r in tok.input_ids])
    width = int(lengths.max())
    if len(tok) * width > min(PADDED_MAX_ELEMENTS, 2 * int(lengths.sum()) + 4096):
        return None
    token_labels = tok.labels[0].dim() > 0
    if token_labels:
        label_lengths = torch.tensor([len(r) for r in tok.labels])
        if len(tok) * int(label_lengths.max()) > min(PADDED_MAX_ELEMENTS, 2 * int(label_lengths.sum()) + 4096):
            return None
        labels = pad_sequence(tok.labels, batch_first=True, padding_value=IGNORE_INDEX)
    else:
        labels = torch.stack(tok.labels)
    return Padded(
        input_ids=pad_sequence(tok.input_ids, batch_first=True, padding_value=pad_id), labels=labels,
        lengths=lengths,
        label_lengths=label_lengths if token_labels and not torch.equal(label_lengths, lengths) else None,
    )


def collate(tok: Tokenized, indices: list[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels.

    Token labels are padded with -100 (ignored by the loss); a classification label (0-d tensor per
    example) is stacked into shape (batch,). The batch is sliced from the data's padded copy
    (:meth:`Tokenized.padded`) when it has one: the same tensors as padding the rows, ~2x faster.
    """
    padded = tok.padded(pad_id)
    if padded is None:
        return _collate_rows(tok, indices, pad_id=pad_id)
    idx = torch.tensor(indices, dtype=torch.long)
    lengths = padded.lengths[idx]
    width = int(lengths.max())
    mask = (torch.arange(width) < lengths[:, None]).long()
    if padded.labels.dim() == 1:
        labels = padded.labels[idx]
    else:
        label_width = width if padded.label_lengths is None else int(padded.label_lengths[idx].max())
        labels = padded.labels[idx, :label_width]
    return {"input_ids": padded.input_ids[idx, :width], "attention_mask": mask, "labels": labels}


def _collate_rows(tok: Tokenized, indices: list[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`collate` padding the batch's own rows."""
    rows = [tok.input_ids[i] for i in indices]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    if tok.labels[indices[0]].dim() > 0:  # per-token labels: padded with IGNORE_INDEX
        labels = pad_sequence([tok.labels[i] for i in indices], batch_first=True, padding_value=IGNORE_INDEX)
    else:
        labels = torch.stack([tok.labels[i] for i in indices])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
