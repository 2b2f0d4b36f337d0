"""ELECTRA example building, train/valid split, blending and the resumable DataLoader."""

import numpy as np
import pytest
import torch

from alectra.data import build_dataloader, build_pretraining_datasets
from alectra.data.datasets import blend_indices
from alectra.data.examples import plan_shard
from alectra.storage.atomic import write_json_atomic
from alectra.storage.indexed import IndexedDatasetWriter
from alectra.storage.manifest import FORMAT

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def write_dataset(root, docs, docs_per_shard=50):
    """A dataset folder as data_prep writes it, from token-id documents (lists of sentences)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(0, len(docs), docs_per_shard):
        w = IndexedDatasetWriter(root / f"shard_{k:05d}", np.uint16)
        for d in docs[k : k + docs_per_shard]:
            w.add_document(d)
        shards.append({"prefix": f"shard_{k:05d}", **w.finish()})
    tok = {
        "name_or_path": "synthetic",
        "vocab_size": 1000,
        "vocab_sha256": "0" * 64,
        "special_tokens": SPECIAL,
    }
    write_json_atomic(root / "manifest.json", {"format": FORMAT, "tokenizer": tok, "shards": shards})
    return str(root)


def random_docs(seed, n_docs, lo=5, hi=1000):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sents = [rng.integers(lo, hi, size=rng.integers(1, 40)).tolist() for _ in range(rng.integers(1, 15))]
        if rng.random() < 0.05:
            sents.insert(
                0, rng.integers(lo, hi, size=300).tolist()
            )  # over-long sentence: truncated, not dropped
        docs.append(sents)
    return docs


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    docs = random_docs(0, 400)
    return write_dataset(tmp_path_factory.mktemp("syn") / "ds", docs), docs


def build(path, **kw):
    args = dict(max_seq_length=64, seed=7, valid_fraction=0.1, num_train_samples=None)
    args.update(kw)
    return build_pretraining_datasets(
        [path] if isinstance(path, str) else path, kw.pop("weights", None), **args
    )


def test_example_invariants(synthetic):
    path, docs = synthetic
    train, valid = build(path)
    pool = train.pool
    # Plan: per shard, the rows tile every sequence exactly once, in order, and never cross a document.
    for k, ds in enumerate(pool.shards):
        rows = np.asarray(pool.plan[pool.plan[:, 0] == k])
        assert rows[0, 1] == 0 and rows[-1, 3] == len(ds) and (rows[1:, 1] == rows[:-1, 3]).all()
        doc_of = np.searchsorted(np.asarray(ds.doc_idx), np.arange(len(ds)), side="right") - 1
        assert (doc_of[rows[:, 1]] == doc_of[rows[:, 3] - 1]).all()
        assert ((rows[:, 1] <= rows[:, 2]) & (rows[:, 2] <= rows[:, 3])).all()
    # Every example, checked against the documents themselves (not the reader): [CLS] A [SEP] (B [SEP]),
    # A/B cut from the same document's sentences, A truncated to max-2 and B to max-len(A)-3.
    seen_truncated = False
    for j, (k, start, split, end) in enumerate(np.asarray(pool.plan).tolist()):
        ds = pool.shards[k]
        d_local = int(np.searchsorted(np.asarray(ds.doc_idx), start, side="right")) - 1
        doc = docs[k * 50 + d_local]
        first = int(ds.doc_idx[d_local])
        a = sum(doc[start - first : split - first], [])[:62]
        b = sum(doc[split - first : end - first], [])[: max(0, 64 - len(a) - 3)]
        want = [SPECIAL["cls"], *a, SPECIAL["sep"]] + ([*b, SPECIAL["sep"]] if b else [])
        ex = pool.example(j)
        ids, mask, tt = ex["input_ids"], ex["attention_mask"], ex["token_type_ids"]
        assert all(v.shape == (64,) and v.dtype == np.int64 for v in ex.values())
        n = len(want)
        assert ids[:n].tolist() == want and (ids[n:] == SPECIAL["pad"]).all()
        assert mask.tolist() == [1] * n + [0] * (64 - n)
        assert tt.tolist() == [0] * (len(a) + 2) + [1] * (n - len(a) - 2) + [0] * (64 - n)
        seen_truncated |= n == 64 and not b and len(doc[start - first]) == 300
    assert seen_truncated  # 300-token sentences are cut to max_seq_length - 2, their documents kept
    assert set(train[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert (valid[0]["input_ids"] == pool.example(int(valid.ids[0]))["input_ids"]).all()


def test_rates_match_reference_probabilities():
    """One long document of 1-token sentences: every example's length is its target length exactly."""
    max_len, n_sent = 32, 700_000
    rows = plan_shard(np.ones(n_sent, np.int32), np.array([0, n_sent]), max_len, np.random.default_rng(3))
    rows = rows[:-1]  # the document's leftover example is shorter by construction
    length = rows[:, 2] - rows[:, 0]
    n = len(rows)
    # 5% of examples get a random target length in [5, max_len] (randint includes max_len: 1/28 of those).
    short = length < max_len
    p_short = 0.05 * 27 / 28
    assert abs(short.mean() - p_short) < 4.5 * np.sqrt(p_short * (1 - p_short) / n)
    # ... uniformly: the short lengths 5..31 are equally likely; chi-square, df=26, 0.999 quantile 54.05
    counts = np.bincount(length[short] - 5, minlength=27)
    assert len(counts) == 27 and length.min() >= 5
    expected = counts.sum() / 27
    assert ((counts - expected) ** 2 / expected).sum() < 54.05
    # 10% of examples are one segment (split == end).
    single = rows[:, 1] == rows[:, 2]
    assert abs(single.mean() - 0.1) < 4.5 * np.sqrt(0.1 * 0.9 / n)
    # Two-segment full-length examples: A is 13 tokens, or 14 when the coin (p=1/2) lets it pass its target.
    a_len = (rows[:, 1] - rows[:, 0])[~single & ~short]
    assert set(np.unique(a_len)) == {13, 14}
    m = len(a_len)
    assert abs((a_len == 14).mean() - 0.5) < 4.5 * np.sqrt(0.25 / m)


def test_pure_function_of_seed_and_index(synthetic, tmp_path):
    path, docs = synthetic
    train, _ = build(path)
    order = [5, 0, len(train) - 1, 17, 5]
    first = [train[i]["input_ids"].copy() for i in order]
    train2, _ = build(path)  # plan now comes from the .npy cache, memory-mapped
    assert isinstance(train2.pool.plan, np.memmap)
    assert all((train2[i]["input_ids"] == f).all() for i, f in zip(order, first, strict=True))
    assert (first[0] == first[-1]).all()
    # a fresh copy of the data (no cache) plans the same examples
    path3 = write_dataset(tmp_path / "copy", docs)
    train3, _ = build(path3)
    assert all((train3[i]["input_ids"] == f).all() for i, f in zip(order, first, strict=True))
    other, _ = build(path, seed=8)
    assert any((other[i]["input_ids"] != f).any() for i, f in zip(order, first, strict=True))


def test_train_valid_split_is_deterministic_and_disjoint(synthetic):
    path, _ = synthetic
    train, valid = build(path)
    e = len(train.pool.plan)
    assert len(valid) == round(0.1 * e) and len(train) + len(valid) == e
    assert not set(train.ids.tolist()) & set(valid.ids.tolist())
    train2, valid2 = build(path)
    assert (valid2.ids == valid.ids).all()


def test_epochs_reshuffle_and_cover(synthetic):
    path, _ = synthetic
    train, _ = build(path, num_train_samples=None)
    n = len(train)
    long, _ = build(path, num_train_samples=2 * n + 3)
    assert len(long) == 2 * n + 3

    def keys(ds, lo, hi):
        return sorted(ds[i]["input_ids"].tobytes() for i in range(lo, hi))

    assert keys(long, 0, n) == keys(long, n, 2 * n) == keys(train, 0, n)
    assert any((long[i]["input_ids"] != long[n + i]["input_ids"]).any() for i in range(10))


def test_blend_indices_tracks_weights():
    w = np.array([0.5, 0.3, 0.2])
    ds_idx, smp_idx = blend_indices(w, 10_000)
    for n in (10, 333, 10_000):
        counts = np.bincount(ds_idx[:n], minlength=3)
        assert (np.abs(counts - w * n) <= 1.5).all(), (n, counts)
    for d in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert (smp_idx[ds_idx == d] == np.arange((ds_idx == d).sum())).all()


def test_blended_datasets(tmp_path):
    a = write_dataset(tmp_path / "a", random_docs(1, 60, lo=5, hi=500))
    b = write_dataset(tmp_path / "b", random_docs(2, 60, lo=500, hi=1000))
    train, valid = build_pretraining_datasets(
        [a, b], [3.0, 1.0], max_seq_length=64, seed=1, valid_fraction=0.05, num_train_samples=2000
    )
    assert len(train) == 2000
    from_a = np.array([train[i]["input_ids"][1] < 500 for i in range(2000)])
    assert abs(from_a.mean() - 0.75) < 0.002  # the blend is exact up to +-1 sample per prefix
    assert len(valid) == len(valid.datasets[0]) + len(valid.datasets[1])
    with pytest.raises(ValueError, match="one non-negative weight per data path"):
        build_pretraining_datasets(
            [a, b], [1.0], max_seq_length=64, seed=1, valid_fraction=0.0, num_train_samples=None
        )


def test_dataloader_resume_and_ranks(synthetic):
    path, _ = synthetic
    train, _ = build(path)
    mbs, dp = 4, 2

    def batches(consumed, rank, workers=0, k=3):
        dl = build_dataloader(
            train,
            micro_batch_size=mbs,
            consumed_samples=consumed,
            dp_rank=rank,
            dp_size=dp,
            num_workers=workers,
        )
        return [b for _, b in zip(range(k), dl, strict=False)]

    full = {r: batches(0, r, k=5) for r in range(dp)}
    b = full[0][0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.shape == (mbs, 64) and v.dtype == torch.int64 for v in b.values())
    # global batch k, rank r = samples consumed + k*mbs*dp + r*mbs ... + mbs
    expected = torch.from_numpy(
        np.stack([train[1 * mbs * dp + 1 * mbs + j]["input_ids"] for j in range(mbs)])
    )
    assert torch.equal(full[1][1]["input_ids"], expected)
    resumed = batches(2 * mbs * dp, 1)
    for x, y in zip(resumed, full[1][2:], strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
    with_workers = batches(2 * mbs * dp, 1, workers=2)
    for x, y in zip(with_workers, resumed, strict=True):
        assert all(torch.equal(x[key], y[key]) for key in x)
    with pytest.raises(ValueError, match="consumed_samples"):
        batches(len(train) + 1, 0)


def reference_line_pairs(docs, docs_per_shard, seed, max_len):
    """The seed's examples (recipe_spec.md 6.1, lmtuners tokenize_and_cache_data.py), written from the
    description: per document, its non-empty lines in a random order (each line's key drawn from the shard's
    generator, as alectra.data.examples.plan_line_pairs documents), taken in consecutive pairs; each line cut
    to (max_len + 1) // 2 tokens with its own [CLS]/[SEP]; [CLS] A [SEP] B [SEP], types 0 then 1."""
    cut = (max_len + 1) // 2 - 2
    cls, sep, pad = SPECIAL["cls"], SPECIAL["sep"], SPECIAL["pad"]
    examples = []
    for k, first_doc in enumerate(range(0, len(docs), docs_per_shard)):
        shard_docs = docs[first_doc : first_doc + docs_per_shard]
        keys = np.random.default_rng([seed, k]).random(sum(len(d) for d in shard_docs))
        first_seq = 0
        for doc in shard_docs:
            lines = [first_seq + i for i, line in enumerate(doc) if line]
            order = sorted(lines, key=lambda s: keys[s])
            for p in range(0, len(order) - 1, 2):
                a, b = doc[order[p] - first_seq][:cut], doc[order[p + 1] - first_seq][:cut]
                ids = [cls, *a, sep, *b, sep]
                n = len(ids)
                assert n <= max_len
                examples.append(
                    {
                        "input_ids": ids + [pad] * (max_len - n),
                        "attention_mask": [1] * n + [0] * (max_len - n),
                        "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (max_len - n),
                    }
                )
            first_seq += len(doc)
    return examples


@pytest.mark.parametrize("max_len", [128, 33])
def test_line_pairs_match_reference(tmp_path, max_len):
    """examples="line_pairs" (issue 13 item 3): two lines of one document as A and B, each cut to 64
    tokens at max_seq_length 128; blank lines dropped, an odd last line and one-line documents give
    nothing."""
    docs = random_docs(4, 120)
    docs[3] = [docs[3][0]]  # one line: no example
    docs[5] = [[], *docs[5], []]  # blank lines (empty sequences) are not lines
    path = write_dataset(tmp_path / "ds", docs, docs_per_shard=40)
    train, valid = build(path, max_seq_length=max_len, examples="line_pairs")
    want = reference_line_pairs(docs, 40, seed=7, max_len=max_len)
    pool = train.pool
    assert len(pool.plan) == len(want) == len(train) + len(valid) > 200
    for j, ref in enumerate(want):
        got = pool.example(j)
        assert all(got[key].tolist() == ref[key] for key in ref), j
    assert any(ex["attention_mask"][-1] == 1 for ex in want) == (max_len == 33)  # long lines fill 33
    # deterministic per sample index: a second build (plan from the cache) and the index order agree
    again, _ = build(path, max_seq_length=max_len, examples="line_pairs")
    for i in (0, 7, len(train) - 1):
        assert (again[i]["input_ids"] == train[i]["input_ids"]).all()
    # A is the earlier line of the document half of the time (the order within a pair is random too)
    rows = np.asarray(pool.plan)
    earlier = (rows[:, 1] < rows[:, 2]).mean()
    assert abs(earlier - 0.5) < 4.5 * np.sqrt(0.25 / len(rows))
    electra, _ = build(path, max_seq_length=max_len)
    assert electra.pool.plan.shape[1] == 4 and len(electra.pool.plan) != len(pool.plan)
