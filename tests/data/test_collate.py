"""collate: right padding, the attention mask and the labels, written out by hand."""

import torch

from fedtune.data.format import IGNORE_INDEX, Tokenized, collate


def _t(*values):
    return torch.tensor(values, dtype=torch.long)


def test_token_labels_are_right_padded_with_the_ignore_index():
    tok = Tokenized(input_ids=[_t(5, 6, 7), _t(8), _t(9, 10)], labels=[_t(-100, 6, 7), _t(8), _t(-100, 10)],
                    num_truncated=0)
    batch = collate(tok, [1, 0], pad_id=0)  # in the order asked for
    assert batch["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[8, IGNORE_INDEX, IGNORE_INDEX], [-100, 6, 7]]
    assert all(v.dtype == torch.long for v in batch.values())
    single = collate(tok, [2], pad_id=3)  # no padding: the widest row sets the width
    assert single["input_ids"].tolist() == [[9, 10]] and single["attention_mask"].tolist() == [[1, 1]]


def test_class_labels_are_stacked():
    tok = Tokenized(input_ids=[_t(5, 6), _t(7)], labels=[torch.tensor(2), torch.tensor(0)], num_truncated=0)
    batch = collate(tok, [0, 1], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [2, 0]
