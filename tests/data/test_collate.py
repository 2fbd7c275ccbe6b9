"""collate: right padding, the attention mask and the labels, written out by hand; the batches sliced
from the padded copy of the data against padding each batch's rows."""

import pytest
import torch

from fedtune.data import format as fmt
from fedtune.data.format import IGNORE_INDEX, Tokenized, collate


@pytest.fixture(params=["padded", "rows"], autouse=True)
def path(request, monkeypatch):
    """Every test twice: batches sliced from the padded copy, and (no copy allowed) padded row by row."""
    if request.param == "rows":
        monkeypatch.setattr(fmt, "PADDED_MAX_ELEMENTS", 0)
    return request.param


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


def test_labels_longer_than_their_inputs_are_padded_to_their_own_width():
    tok = Tokenized(input_ids=[_t(5, 6), _t(7)], labels=[_t(1, 2, 3), _t(4)], num_truncated=0)
    batch = collate(tok, [1, 0], pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 0], [5, 6]]
    assert batch["labels"].tolist() == [[4, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3]]
    assert collate(tok, [1], pad_id=0)["labels"].tolist() == [[4]]


def test_sliced_batches_equal_padded_rows(path):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (200,), generator=gen).tolist()
    ids = [torch.randint(0, 1000, (n,), generator=gen) for n in lengths]
    token = Tokenized(input_ids=ids, labels=[torch.where(t % 3 == 0, IGNORE_INDEX, t) for t in ids])
    classes = Tokenized(input_ids=ids, labels=[torch.tensor(n % 7) for n in lengths])
    for tok in (token, classes):
        for _ in range(50):
            batch_idx = torch.randint(0, 200, (8,), generator=gen).tolist()
            got, want = collate(tok, batch_idx, pad_id=2), fmt._collate_rows(tok, batch_idx, pad_id=2)
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and got[k].is_contiguous() and torch.equal(got[k], want[k]), k
        assert (tok.padded(2) is not None) == (path == "padded")


def test_the_padded_copy_is_made_once_and_used(path, monkeypatch):
    if path == "rows":
        pytest.skip("the copy is not allowed here")
    tok = Tokenized(input_ids=[_t(5, 6, 7), _t(8)], labels=[_t(5, 6, 7), _t(8)])
    assert tok.padded(0) is tok.padded(0) and tok.padded(0) is not tok.padded(1)
    assert tok.padded(1).input_ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    monkeypatch.setattr(fmt, "_collate_rows", None)  # a batch padded row by row would fail here
    assert collate(tok, [1], pad_id=0)["input_ids"].tolist() == [[8]]


def test_long_tailed_lengths_are_padded_batch_by_batch(path):
    """One long row would make the padded copy mostly padding (> 2x the tokens): no copy is made."""
    for labels in ([_t(*range(5000))] + [_t(1)] * 100, [torch.tensor(3)] * 101):  # token or class labels
        tok = Tokenized(input_ids=[_t(*range(5000))] + [_t(1)] * 100, labels=labels)
        assert tok.padded(0) is None
        assert collate(tok, [1, 2], pad_id=0)["input_ids"].tolist() == [[1], [1]]
    tok = Tokenized(input_ids=[_t(1, 2)] * 100, labels=[_t(*range(5000))] + [_t(1, 2)] * 99)  # the labels' tail
    assert tok.padded(0) is None
