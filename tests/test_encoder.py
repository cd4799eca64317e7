"""The encoder, the losses and the metrics on hand-made inputs (no warehouse needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.batches import ItemSampler
from models.data import pad_lists
from models.encoder import Encoder, ItemTables
from models.encoder_config import EncoderConfig
from models.layers import Dropout, FeatureBag
from models.losses import info_nce, sampled_bce
from models.metrics import hit_rate, ndcg, retrieval_metrics, score, target_ranks

N_ITEMS, N_COLD, L = 40, 3, 8


def small_config(**arch) -> EncoderConfig:
    base = dict(
        num_item_rows=N_ITEMS + 1 + N_COLD, id_rows=N_ITEMS + 1, item_vocab=(5, 7), user_vocab=(3, 4, 6),
        num_user_sparse=2, multi_len=3, mm_dims=(6,), sid_vocab=(5, 5, 3), n_actions=3, max_len=16,
        time_origin=1_700_000_000, d_model=16, n_layers=2, n_heads=2, dropout=0.0,
    )
    base.update(arch)
    return EncoderConfig(**base)


def small_tables(seed: int = 0) -> ItemTables:
    g = torch.Generator().manual_seed(seed)
    rows = N_ITEMS + 1 + N_COLD
    feats = torch.stack([torch.randint(0, 6, (rows,), generator=g), torch.randint(0, 8, (rows,), generator=g)], 1)
    mask = torch.rand(rows, 1, generator=g) > 0.2
    sids = torch.randint(1, 5, (rows, 3), generator=g)
    for t in (feats, sids):
        t[0] = 0
    return ItemTables(feats.int(), [torch.randn(rows, 6, generator=g) * mask], mask, sids.int())


def make_batch(B: int = 3, length: int = L, seed: int = 0, lengths=(8, 5, 1)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.zeros(B, length, dtype=torch.long)
    actions = torch.zeros(B, length, dtype=torch.long)
    times = torch.zeros(B, length, dtype=torch.long)
    for b, n in enumerate(lengths[:B]):
        items[b, length - n :] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
        actions[b, length - n :] = torch.randint(0, 3, (n,), generator=g)
        times[b, length - n :] = torch.cumsum(torch.randint(1, 10_000, (n,), generator=g), 0)
    return {
        "items": items, "actions": actions, "times": times,
        "user_sparse": torch.randint(0, 4, (B, 2), generator=g),
        "user_multi": torch.randint(0, 5, (B, 1, 3), generator=g),
    }


def model_for(**arch) -> Encoder:
    torch.manual_seed(0)
    model = Encoder(small_config(**arch)).attach(small_tables())
    # Non-zero id embeddings, so that the id path is exercised by the tests below.
    with torch.no_grad():
        model.item_id.weight[1:].normal_(std=0.1)
    return model.eval()


def left_pad(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    out = dict(batch)
    for key in ("items", "actions", "times"):
        out[key] = torch.nn.functional.pad(batch[key], (extra, 0))
    return out


# --- Shapes, causality, padding --------------------------------------------------------------


@pytest.mark.parametrize("arch", [{}, {"norm": "rmsnorm", "mlp": "swiglu"}, {"id_buckets": 7, "action_conditioning": False}])
def test_shapes(arch):
    model = model_for(**arch)
    batch = make_batch()
    h = model.encode(batch)
    assert h.shape == (3, L + 1, 16) and torch.isfinite(h).all()
    users = model.user_vectors(batch, (1, 2))
    assert users.shape == (3, 16)
    torch.testing.assert_close(users.norm(dim=-1), torch.ones(3))
    items = model.item_vectors(torch.arange(N_ITEMS + 1 + N_COLD))
    assert items.shape == (N_ITEMS + 1 + N_COLD, 16) and torch.isfinite(items).all()


@pytest.mark.parametrize("n_layers", [1, 2])
def test_last_only_encoding_equals_the_last_token_of_the_full_pass(n_layers):
    model = model_for(n_layers=n_layers)
    batch = make_batch(lengths=(8, 5, 0))  # an empty history too: the user token is last
    full = model.encode(batch)[:, -1]
    last = model.encode(batch, last_only=True)
    assert last.shape == (3, 1, 16)
    torch.testing.assert_close(last[:, -1], full, rtol=0, atol=1e-5)


def test_no_position_attends_to_the_future():
    model = model_for()
    batch = make_batch(lengths=(8, 8, 8))
    before = model.encode(batch)
    for j in (3, 6):  # token j + 1 holds item column j
        changed = {k: v.clone() for k, v in batch.items()}
        changed["items"][:, j] = (changed["items"][:, j] % N_ITEMS) + 1
        changed["actions"][:, j] = (changed["actions"][:, j] + 1) % 3
        changed["times"][:, j:] += 77_777
        after = model.encode(changed)
        torch.testing.assert_close(after[:, : j + 1], before[:, : j + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, j + 1 :], before[:, j + 1 :])


def test_padding_changes_nothing():
    model = model_for()
    batch = make_batch()
    h = model.encode(batch)
    padded = left_pad(batch, 5)
    h_padded = model.encode(padded)
    lengths = (batch["items"] > 0).sum(1)
    for b, n in enumerate(lengths.tolist()):
        # the user token and the n item tokens sit at the right end in both layouts
        torch.testing.assert_close(h_padded[b, -(n + 1) :], h[b, -(n + 1) :], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.user_vectors(padded, (1,)), model.user_vectors(batch, (1,)), rtol=0, atol=1e-5)
    # Whatever sits in padded slots (garbage times or actions) is ignored as well.
    noisy = {k: v.clone() for k, v in padded.items()}
    noisy["actions"][:, :5] = 2
    noisy["times"][:, :5] = 123_456
    torch.testing.assert_close(model.user_vectors(noisy, (1,)), model.user_vectors(batch, (1,)), rtol=0, atol=1e-5)


def test_every_history_alone_and_unpadded_gets_its_batched_states():
    """The blocks see right-padded tokens under a plain causal mask: each row's states equal
    those of its history encoded alone, where there is no padding at all."""
    model = model_for()
    lengths = (8, 5, 1)
    batch = left_pad(make_batch(lengths=lengths), 4)
    h = model.encode(batch)
    users = model.user_vectors(batch, (1,))
    for b, n in enumerate(lengths):
        alone = {k: (v[b : b + 1, -n:] if k in ("items", "actions", "times") else v[b : b + 1]) for k, v in batch.items()}
        torch.testing.assert_close(model.encode(alone)[0], h[b, -(n + 1) :], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.user_vectors(alone, (1,))[0], users[b], rtol=0, atol=1e-5)


def test_action_conditioning_changes_the_query():
    model = model_for()
    with torch.no_grad():
        model.film.weight.normal_(std=0.5)
    batch = make_batch()
    assert not torch.allclose(model.user_vectors(batch, (1,)), model.user_vectors(batch, (2,)))


def test_cold_items_embed_from_features_alone():
    model = model_for()
    rows = torch.tensor([N_ITEMS + 1, N_ITEMS + 2])  # rows past id_rows: no id embedding
    t = model.tables
    direct = model.embed_items(rows, t.feats[rows], [t.mm[0][rows]], t.mm_mask[rows], t.sids[rows])
    with torch.no_grad():
        model.item_id.weight.mul_(100)  # the id table does not matter for them
    torch.testing.assert_close(model.item_tower(rows), direct)


def test_training_forward_backward_sparse_and_dense():
    model = model_for(sparse_threshold=10)  # the id table (41 rows) gets sparse gradients
    model.train()
    batch = make_batch()
    batch.update(
        weights=(batch["items"] > 0).float(), neg_items=torch.tensor([1, 2, 3, 5, 8]),
        neg_logq=torch.zeros(5), pos_logq=torch.zeros(3, L), loss_scale=torch.tensor(1 / 14),
    )
    loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.item_id.weight.grad.is_sparse
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_feature_bag_hashes_large_vocabularies_and_skips_missing():
    bag = FeatureBag([10, 1000], dim=4, buckets=100, sparse_threshold=10**9)
    assert bag.bag.num_embeddings == 1 + 10 + 100
    out = bag(torch.tensor([[0, 0], [3, 0], [3, 105], [3, 5]]))
    torch.testing.assert_close(out[0], torch.zeros(4))
    torch.testing.assert_close(out[2], out[3])  # 105 and 5 share a bucket


def test_fast_dropout_keeps_the_expected_share():
    torch.manual_seed(0)
    drop = Dropout(0.2).train()
    y = drop(torch.ones(200_000))
    assert abs(float((y > 0).float().mean()) - 0.8) < 0.01
    assert torch.allclose(y[y > 0], torch.tensor(1.25))
    assert torch.equal(drop.eval()(torch.ones(5)), torch.ones(5))


# --- Losses against hand-computed values -------------------------------------------------------


def test_info_nce_with_logq_matches_a_hand_computed_example():
    user = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalized: e1, e2
    pos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos: 1, 1/sqrt(2)
    neg = torch.tensor([[0.0, 3.0], [1.0, 0.0]])  # item ids 7, 4
    tau = 0.5
    loss = info_nce(
        user, pos, neg, temperature=tau,
        pos_log_q=torch.tensor([math.log(0.5), math.log(0.25)]),
        neg_log_q=torch.tensor([math.log(0.25), math.log(0.5)]),
        pos_ids=torch.tensor([4, 9]), neg_ids=torch.tensor([7, 4]),
        weights=torch.tensor([1.0, 2.5]),
    )
    # Position 0: positive logit 1/0.5 - log 0.5 = 2.6931; negative 7: 0 - log 0.25 = 1.3863;
    # negative 4 is the position's own target: masked.
    l0 = math.log(math.exp(2.0 - math.log(0.5)) + math.exp(0.0 - math.log(0.25))) - (2.0 - math.log(0.5))
    # Position 1: positive (1/sqrt 2)/0.5 - log 0.25 = 2.8005; negative 7: 1/0.5 - log 0.25 = 3.3863;
    # negative 4: 0 - log 0.5 = 0.6931.
    p1 = (1 / math.sqrt(2)) / tau - math.log(0.25)
    l1 = math.log(math.exp(p1) + math.exp(2.0 - math.log(0.25)) + math.exp(-math.log(0.5))) - p1
    assert l0 == pytest.approx(0.239538, abs=1e-5)
    assert l1 == pytest.approx(1.070885, abs=1e-5)  # log(16.452 + 29.556 + 2) - 2.8005
    assert float(loss) == pytest.approx((1.0 * l0 + 2.5 * l1) / 3.5, abs=1e-5)


def test_info_nce_fast_masking_and_folded_duplicates_give_the_same_loss():
    g = torch.Generator().manual_seed(2)
    user, pos = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.tensor([9, 3, 9, 5, 1, 3])  # negatives with duplicates, unsorted
    table = {int(i): torch.randn(4, generator=g) for i in ids.unique()}
    neg = torch.stack([table[int(i)] for i in ids])
    log_q = {1: -2.0, 3: -1.0, 5: -3.0, 9: -0.5}
    pos_ids = torch.tensor([3, 7, 9, 1, 2, 5])
    slow = info_nce(user, pos, neg, neg_log_q=torch.tensor([log_q[int(i)] for i in ids]), pos_ids=pos_ids, neg_ids=ids,
                    pos_log_q=torch.zeros(6))
    unique, counts = ids.unique(return_counts=True)  # sorted
    folded = torch.tensor([log_q[int(i)] for i in unique]) - counts.float().log()
    fast = info_nce(user, pos, torch.stack([table[int(i)] for i in unique]), neg_log_q=folded, pos_ids=pos_ids,
                    neg_ids=unique, pos_log_q=torch.zeros(6))
    assert float(fast) == pytest.approx(float(slow), abs=1e-5)


def test_info_nce_without_correction_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(1)
    user, pos, neg = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    loss = info_nce(user, pos, neg, temperature=0.1)
    u, p, n = (torch.nn.functional.normalize(x, dim=-1) for x in (user, pos, neg))
    logits = torch.cat([(u * p).sum(-1, keepdim=True), u @ n.T], 1) / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)


def test_sampled_bce_matches_a_hand_computed_example():
    user, pos, neg = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[-1.0, 0.0]])
    loss = sampled_bce(user, pos, neg)
    # dot(user, pos) = 1.5, dot(user, neg) = -1: -log sigmoid(1.5) - log(1 - sigmoid(-1))
    expected = -math.log(1 / (1 + math.exp(-1.5))) - math.log(1 - 1 / (1 + math.exp(1.0)))
    assert float(loss) == pytest.approx(expected, abs=1e-6)


# --- Metrics, padding of lists, the sampler ------------------------------------------------------


def test_metrics_on_a_hand_computed_example():
    topk = np.array([[5, 3, 9], [1, 2, 3], [7, 8, 6]])
    targets = np.array([3, 4, 7])
    ranks = target_ranks(topk, targets)
    assert ranks.tolist() == [1, -1, 0]
    assert hit_rate(ranks, 3) == pytest.approx(2 / 3)
    assert ndcg(ranks, 3) == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert hit_rate(ranks, 1) == pytest.approx(1 / 3)
    figures = retrieval_metrics(topk, targets, k=3)
    # The competition's weights, by hand: 0.31 HR + 0.69 NDCG.
    assert figures["score"] == pytest.approx(0.31 * 2 / 3 + 0.69 * (1 / math.log2(3) + 1.0) / 3)
    assert score(1.0, 1.0) == pytest.approx(1.0) and score(1.0, 0.0) == pytest.approx(0.31)


def test_pad_lists_left_and_right():
    lengths = np.array([3, 0, 5])
    values = np.arange(1, 9)
    assert pad_lists(lengths, values, 4, np.int32, left=True).tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [5, 6, 7, 8]]
    assert pad_lists(lengths, values, 4, np.int32, left=False).tolist() == [[1, 2, 3, 0], [0, 0, 0, 0], [4, 5, 6, 7]]


def test_sampler_follows_popularity_and_skips_unseen_items():
    counts = np.array([0, 10, 0, 30])
    sampler = ItemSampler(counts, "popularity", 1.0)
    draws = sampler.sample(np.random.default_rng(0), 40_000)
    assert set(np.unique(draws)) == {1, 3}
    assert (draws == 3).mean() == pytest.approx(0.75, abs=0.01)
    uniform = ItemSampler(counts, "uniform").sample(np.random.default_rng(0), 40_000)
    assert (uniform == 3).mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 20])  # logits recomputed in the backward / softmax kept
def test_chunked_full_softmax_equals_autograd_cross_entropy(keep_bytes):
    from models.losses import full_softmax

    torch.manual_seed(0)
    user = torch.randn(37, 8, requires_grad=True)
    items = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.rand(37)
    temperature = torch.tensor(0.3, requires_grad=True)
    # Chunks of 16 rows (the smallest) over 37 positions: three chunks, the last one short.
    loss = full_softmax(user, items, targets, temperature=temperature, weights=weights, cosine=True, chunk_bytes=1,
                        keep_bytes=keep_bytes)
    loss.backward()
    grads = [t.grad.clone() for t in (user, items, temperature)]
    for t in (user, items, temperature):
        t.grad = None
    u, v = torch.nn.functional.normalize(user, dim=-1), torch.nn.functional.normalize(items, dim=-1)
    per_position = torch.nn.functional.cross_entropy(u @ v.T / temperature, targets, reduction="none")
    reference = (per_position * weights).sum() / weights.sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, t in zip(grads, (user, items, temperature)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 20])
def test_full_softmax_leaves_each_positions_history_out(keep_bytes):
    """With ``excluded`` pairs the loss and its gradients are those of a cross-entropy whose
    excluded logits are -inf, chunk by chunk, in both backward paths."""
    from models.encoder import history_pairs
    from models.losses import full_softmax

    torch.manual_seed(1)
    classes = torch.tensor([[0, 0, 3, 5, 3, 9], [0, 2, 4, 6, 8, 10], [0, 0, 0, 0, 7, 1]])  # class 0: padding
    targeted = (classes > 0) & torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]).bool()
    rows, cols = history_pairs(classes, targeted)
    # (position, class - 1). Position 1 (row 0, target 3 after 3, 5): 5 only, its own 3 stays;
    # position 2 (target 9 after 3, 5, 3): 3 twice and 5; position 6 (row 1, target 10): 2, 4, 6, 8.
    pairs = sorted(zip(rows.tolist(), cols.tolist()))
    assert pairs == [(0, 2), (1, 4), (2, 2), (2, 2), (2, 4), (3, 1), (4, 1), (4, 3), (5, 1), (5, 3), (5, 5),
                     (6, 1), (6, 3), (6, 5), (6, 7), (7, 6)]
    assert rows.tolist() == sorted(rows.tolist())
    targets = classes[targeted] - 1
    user = torch.randn(len(targets), 8, requires_grad=True)
    items = torch.randn(10, 8, requires_grad=True)
    loss = full_softmax(user, items, targets, temperature=0.2, cosine=True, chunk_bytes=1, keep_bytes=keep_bytes,
                        excluded=(rows, cols))
    loss.backward()
    grads = [t.grad.clone() for t in (user, items)]
    for t in (user, items):
        t.grad = None
    u, v = torch.nn.functional.normalize(user, dim=-1), torch.nn.functional.normalize(items, dim=-1)
    logits = (u @ v.T / 0.2).index_put((rows, cols), torch.tensor(float("-inf")))
    reference = torch.nn.functional.cross_entropy(logits, targets)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    plain = full_softmax(user.detach(), items.detach(), targets, temperature=0.2, cosine=True)
    assert plain.item() > loss.item() + 0.05  # the history's logits did count before
    for got, t in zip(grads, (user, items)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-6)


def test_trimmed_batches_give_the_same_user_vectors():
    from models.data import trim_padding

    model = model_for()
    batch = left_pad(make_batch(lengths=(6, 3, 1)), 7)
    trimmed = {k: torch.from_numpy(v) for k, v in trim_padding({k: v.numpy() for k, v in batch.items()}).items()}
    assert trimmed["items"].shape[1] == 6 < batch["items"].shape[1]
    torch.testing.assert_close(model.user_vectors(trimmed, (1,)), model.user_vectors(batch, (1,)), rtol=0, atol=1e-5)


def test_next_action_input_tells_a_token_the_action_of_its_target_only():
    model = model_for(next_action_input=True)
    batch = make_batch(lengths=(8, 8, 8))
    before = model.encode(batch)
    j = 4  # token j predicts item column j; it may know that item's action, never the item
    item_changed = {k: v.clone() for k, v in batch.items()}
    item_changed["items"][:, j] = (item_changed["items"][:, j] % N_ITEMS) + 1
    torch.testing.assert_close(model.encode(item_changed)[:, : j + 1], before[:, : j + 1], rtol=0, atol=1e-6)
    action_changed = {k: v.clone() for k, v in batch.items()}
    action_changed["actions"][:, j] = (action_changed["actions"][:, j] + 1) % 3
    after = model.encode(action_changed)
    torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, j], before[:, j])
    # Retrieval asks the last token for the action wanted.
    assert not torch.allclose(model.user_vectors(batch, (1,)), model.user_vectors(batch, (2,)))
