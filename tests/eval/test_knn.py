"""Weighted kNN (docs/reference.md §10.1) against a brute-force reference written out with torch."""

from __future__ import annotations

import warnings

import pytest
import torch

from ssl_vision.eval.knn import knn_accuracy, knn_classify


def brute_force_scores(train, labels, test, num_classes, k, T):
    """Full cosine-similarity matrix, top-k, exp(s/T) weights, scatter-add votes."""
    a = train / train.norm(dim=1, keepdim=True)
    b = test / test.norm(dim=1, keepdim=True)
    sims = b @ a.T  # (M, N)
    s, idx = sims.topk(k, dim=1)
    votes = torch.zeros(test.shape[0], num_classes)
    return votes.scatter_add_(1, labels[idx], (s / T).exp())


def random_problem(n=300, m=57, d=16, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    train = centers[labels] + torch.randn(n, d, generator=g)
    test_labels = torch.randint(0, c, (m,), generator=g)
    test = centers[test_labels] + torch.randn(m, d, generator=g)
    return train, labels, test, test_labels


def test_matches_brute_force_for_several_k():
    train, labels, test, test_labels = random_problem()
    ks, T, C = (1, 5, 20, 100), 0.07, 7
    out = knn_classify(train, labels, test, C, ks=ks, temperature=T, chunk_size=16)
    assert set(out) == set(ks)
    for k in ks:
        ref = brute_force_scores(train, labels, test, C, k, T)
        assert out[k].shape == (test.shape[0], C)
        torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-4)

    acc = knn_accuracy(train, labels, test, test_labels, C, ks=ks, temperature=T, chunk_size=16)
    for k in ks:
        ref = brute_force_scores(train, labels, test, C, k, T)
        top1 = 100.0 * (ref.argmax(1) == test_labels).float().mean().item()
        # rank of the true class with ties to the lower index; in the top 5 iff fewer than 5 classes beat it
        s_true = ref.gather(1, test_labels[:, None])
        lower = torch.arange(C)[None, :] < test_labels[:, None]
        beaten_by = (ref > s_true) | ((ref == s_true) & lower)
        top5 = 100.0 * (beaten_by.sum(1) < 5).float().mean().item()
        assert acc[k]["top1"] == pytest.approx(top1)
        assert acc[k]["top5"] == pytest.approx(top5)
    assert acc[20]["top1"] > 60.0  # well-separated clusters: kNN must do far better than 1/7


def test_weighting_changes_the_answer_versus_majority_vote():
    # One very close neighbour of class 0, two far ones of class 1: majority says 1, exp(s/T) says 0.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    s = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    T = 0.1
    expected = torch.tensor([[torch.exp(s[0, 0] / T), torch.exp(s[0, 1] / T) + torch.exp(s[0, 2] / T)]])
    scores = knn_classify(train, labels, test, num_classes=2, ks=(3,), temperature=T)[3]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.argmax(1).item() == 0
    # with a large temperature the weights flatten into a majority vote
    assert knn_classify(train, labels, test, num_classes=2, ks=(3,), temperature=100.0)[3].argmax(1).item() == 1
    acc = knn_accuracy(train, labels, test, torch.tensor([0]), num_classes=2, ks=(3,), temperature=T)
    assert acc[3] == {"top1": 100.0, "top5": 100.0}  # top-5 means top-min(5, C) = top-2


def test_independent_of_chunk_size():
    train, labels, test, test_labels = random_problem(n=500, m=103, seed=3)
    ref = knn_classify(train, labels, test, 7, ks=(10, 50), chunk_size=4096)
    acc_ref = knn_accuracy(train, labels, test, test_labels, 7, ks=(10, 50), chunk_size=4096)
    for cs in (1, 7, 19, 64, 103):
        out = knn_classify(train, labels, test, 7, ks=(10, 50), chunk_size=cs)
        for k in (10, 50):
            assert torch.equal(out[k], ref[k]), (cs, k)
        assert knn_accuracy(train, labels, test, test_labels, 7, ks=(10, 50), chunk_size=cs) == acc_ref


def test_k_larger_than_train_set_uses_all_and_warns_once():
    train, labels, test, _ = random_problem(n=12, m=5, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = knn_classify(train, labels, test, 7, ks=(5, 50, 200))
    assert len([w for w in caught if "exceeds" in str(w.message)]) == 1
    ref = brute_force_scores(train, labels, test, 7, 12, 0.1)
    torch.testing.assert_close(out[50], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[200], ref, rtol=1e-4, atol=1e-4)


def test_input_dtype_and_scale_do_not_matter():
    train, labels, test, _ = random_problem(seed=4)
    a = knn_classify(train, labels, test, 7, ks=(10,))[10]
    b = knn_classify(train.double() * 5.0, labels.int(), test.double() * 0.1, 7, ks=(10,))[10]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lowest_class_index():
    # Two identical neighbours of classes 2 and 1 -> equal scores; prediction must be class 1.
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([2, 1])
    acc = knn_accuracy(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), num_classes=8, ks=(2,))
    assert acc[2]["top1"] == 100.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(train_features=torch.zeros(0, 4), train_labels=torch.zeros(0, dtype=torch.long)), "train set is empty"),
        (dict(test_features=torch.zeros(0, 4)), "test set is empty"),
        (dict(test_features=torch.randn(3, 5)), "dims differ"),
        (dict(train_labels=torch.tensor([0, 1, 3, 0])), r"\[0, num_classes=3\)"),
        (dict(train_labels=torch.tensor([0, -1, 2, 0])), r"\[0, num_classes=3\)"),
        (dict(train_labels=torch.tensor([0, 1])), r"shape \(4,\)"),
        (dict(train_labels=torch.tensor([0.0, 1.0, 2.0, 0.0])), "integer"),
        (dict(ks=()), "ks"),
        (dict(ks=(0,)), "ks"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=0.001), "overflows"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_errors(kwargs, match):
    args = dict(
        train_features=torch.randn(4, 4),
        train_labels=torch.tensor([0, 1, 2, 0]),
        test_features=torch.randn(3, 4),
        num_classes=3,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_classify(**args)


def test_accuracy_checks_test_labels():
    with pytest.raises(ValueError, match="test_labels"):
        knn_accuracy(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), torch.randn(3, 4), torch.tensor([0, 5, 1]), 3)


# ---------------------------------------------------------------------------------------- chunking and speed
@pytest.mark.parametrize("budget", [1 << 24, 3 * 10 * 16])  # one block, and blocks of 3 rows (last one partial)
def test_rowwise_similarity_is_the_plain_per_pair_dot_product(monkeypatch, budget):
    """The buffered gather gives the very same bits as the straightforward (q[:, None] * train[idx]).sum(-1)."""
    import ssl_vision.eval.knn as knn

    monkeypatch.setattr(knn, "_GATHER_BUDGET", budget)
    g = torch.Generator().manual_seed(3)
    train, queries = torch.randn(50, 16, generator=g), torch.randn(8, 16, generator=g)
    idx = torch.randint(0, 50, (8, 10), generator=g)
    assert torch.equal(knn._rowwise_similarity(queries, train, idx), (queries[:, None, :] * train[idx]).sum(-1))


def test_faiss_sees_at_most_chunk_size_queries_per_call(monkeypatch):
    """Bounded memory: each search holds one chunk of queries, whatever the size of the test set."""
    import faiss

    sizes = []
    search = faiss.IndexFlatIP.search

    def recording_search(self, x, k, *args, **kwargs):
        sizes.append(x.shape[0])
        return search(self, x, k, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexFlatIP, "search", recording_search)
    train, labels, test, _ = random_problem(m=57)
    out = knn_classify(train, labels, test, 7, ks=(5,), chunk_size=16)
    assert sizes == [16, 16, 16, 9] and out[5].shape == (57, 7)
    torch.testing.assert_close(out[5], brute_force_scores(train, labels, test, 7, 5, 0.1), rtol=1e-4, atol=1e-4)


def test_bank_larger_than_a_faiss_block_matches_brute_force_and_restores_faiss_setting():
    import faiss

    before = faiss.cvar.distance_compute_blas_database_bs
    train, labels, test, _ = random_problem(n=20_000, m=300, d=8, c=7)  # > 2 blocks of 8192 bank rows, BLAS path
    out = knn_classify(train, labels, test, 7, ks=(20,), chunk_size=256)
    torch.testing.assert_close(out[20], brute_force_scores(train, labels, test, 7, 20, 0.1), rtol=1e-4, atol=1e-4)
    assert faiss.cvar.distance_compute_blas_database_bs == before
