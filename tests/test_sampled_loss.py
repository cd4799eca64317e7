"""The sampled loss that real data uses: log Q of positives and negatives from one formula,
negatives drawn from the candidate pool, and a bank of earlier batches' negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.batches import BatchMaker, NegativeSpec
from models.losses import NegativeQueue, info_nce, own_columns
from models.train import train
from models.train_config import Preset, TrainConfig
from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
from taac_dagster.steps.training import track_run
from tests.test_encoder import make_batch, model_for
from tests.test_training import TINY_MODEL, TINY_TRAIN, build

SAMPLED = dict(batch_negatives=40, sampled_negatives=16, sampler="popularity", sampler_alpha=0.75)


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    paths = build(tmp_path_factory.mktemp("sampled_loss"), "1M", 400, 1500)
    return prepare_arrays(paths.warehouse, paths.checkpoints / "arrays", "1M", PrepareOptions(val_users=100))


def inclusion_log_q(arrays, items: np.ndarray, batch_items: int, sampled: int, alpha: float, pool: int) -> np.ndarray:
    """log P(row among a batch's negatives) for every row (-inf: never), from the arrays alone."""
    counts = np.asarray(arrays.item_counts).sum(axis=1).astype(np.float64)
    p_position = counts / counts.sum()
    distinct = np.unique(items[items > 0])
    keep = min(1.0, batch_items / len(distinct))
    in_batch = 1 - (1 - p_position) ** int((items > 0).sum())
    p_sampler = counts**alpha / (counts**alpha).sum()
    cand = np.unique(np.asarray(arrays.cand_rows))
    p_pool = np.zeros(len(counts))
    p_pool[cand] = 1 / len(cand)
    with np.errstate(divide="ignore"):
        return np.log(1 - (1 - keep * in_batch) * (1 - p_sampler) ** sampled * (1 - p_pool) ** pool)


def maker_for(arrays, pool: int = 0, **spec) -> BatchMaker:
    spec = {"batch_items": 40, "sampled": 16, "sampler": "popularity", "alpha": 0.75, "pool": pool, **spec}
    return BatchMaker(arrays, 64, seed=2, negatives=NegativeSpec(**spec))


# --- log Q --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [0, 24])
def test_positive_log_q_follows_the_inclusion_formula_whether_drawn_or_not(arrays, pool):
    maker = maker_for(arrays, pool)
    rows = np.sort(maker.order(0)[:64])
    one, two = (maker.make(rows, np.random.default_rng(seed)) for seed in (1, 2))  # same items, other draws
    items = one["items"]
    assert len(np.unique(items[items > 0])) > 40  # more distinct items than batch_negatives: a subset is kept
    expected = inclusion_log_q(arrays, items, 40, 16, 0.75, pool)
    weighted = one["weights"] > 0
    np.testing.assert_allclose(one["pos_logq"][weighted], expected[items[weighted]], rtol=1e-5)
    np.testing.assert_allclose(one["neg_logq"], expected[one["neg_items"]], rtol=1e-5)
    # Positives left out of the kept subset get their correction too (the old code gave them 0).
    left_out = weighted & ~np.isin(items, one["neg_items"])
    assert left_out.sum() > 10 and (one["pos_logq"][left_out] < 0).all()
    # Other draws, other subsets: an item drawn in one batch and not in the other keeps its log Q.
    swapped = weighted & (np.isin(items, one["neg_items"]) != np.isin(items, two["neg_items"]))
    assert swapped.any()
    np.testing.assert_array_equal(one["pos_logq"], two["pos_logq"])
    lookup = dict(zip(one["neg_items"].tolist(), one["neg_logq"].tolist()))
    drawn = weighted & np.isin(items, one["neg_items"])
    np.testing.assert_allclose(one["pos_logq"][drawn], [lookup[i] for i in items[drawn].tolist()], rtol=1e-6)
    assert not one["pos_logq"][items == 0].any()


def test_pool_negatives_are_uniform_draws_from_the_candidate_rows(arrays):
    cand = np.unique(np.asarray(arrays.cand_rows).astype(np.int64))
    seen = np.asarray(arrays.item_counts).sum(axis=1) > 0
    assert (~seen[cand]).any() and (cand >= arrays.meta["id_rows"]).any()  # cold and never-trained candidates
    # Pool draws alone: only candidate rows, each with its expected count pool / C (multiplicity folded).
    only = BatchMaker(arrays, 64, seed=2, negatives=NegativeSpec(pool=3000)).batch(0)
    neg = only["neg_items"]
    assert set(neg.tolist()) <= set(cand.tolist()) and len(neg) > 0.8 * len(cand)
    draws = np.round(np.exp(math.log(3000 / len(cand)) - only["neg_logq"])).astype(int)
    assert draws.sum() == 3000 and (draws >= 1).all()
    assert (neg >= arrays.meta["id_rows"]).any()  # cold candidates are drawn too
    # With the batch's items: the pool's draws come after every other draw, so the batch's own
    # negatives stay what they were; a pool row no sequence holds has log Q from its draws alone.
    plain, pooled = maker_for(arrays, 0).batch(3), maker_for(arrays, 256).batch(3)
    np.testing.assert_array_equal(plain["items"], pooled["items"])
    assert set(plain["neg_items"].tolist()) < set(pooled["neg_items"].tolist())
    extra = np.setdiff1d(pooled["neg_items"], plain["neg_items"])
    assert set(extra.tolist()) <= set(cand.tolist())
    lonely = extra[~seen[extra]]
    assert len(lonely)
    q = dict(zip(pooled["neg_items"].tolist(), pooled["neg_logq"].tolist()))
    np.testing.assert_allclose([q[i] for i in lonely.tolist()], math.log(1 - (1 - 1 / len(cand)) ** 256), rtol=1e-5)
    # Everything else also follows the one formula (pool term included).
    expected = inclusion_log_q(arrays, pooled["items"], 40, 16, 0.75, 256)
    np.testing.assert_allclose(pooled["neg_logq"], expected[pooled["neg_items"]], rtol=1e-5)


# --- The bank of earlier negatives ----------------------------------------------------------------


def test_own_columns_finds_every_copy_of_the_positive():
    g = torch.Generator().manual_seed(0)
    neg_ids = torch.randint(1, 12, (40,), generator=g)  # unsorted, with duplicates
    pos_ids = torch.randint(0, 14, (25,), generator=g)
    rows, cols = own_columns(pos_ids, neg_ids)
    mask = torch.zeros(25, 40, dtype=torch.bool)
    mask[rows, cols] = True
    assert torch.equal(mask, pos_ids[:, None] == neg_ids[None, :]) and len(rows) == int(mask.sum())
    unique = torch.unique(neg_ids)  # sorted and distinct: searched as it is
    rows, cols = own_columns(pos_ids, unique)
    assert sorted(map(list, zip(rows.tolist(), cols.tolist()))) == (pos_ids[:, None] == unique[None, :]).nonzero().tolist()


def test_info_nce_over_several_sets_matches_a_reference():
    g = torch.Generator().manual_seed(1)
    user, pos = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    neg, ids = torch.randn(9, 4, generator=g), torch.tensor([3, 1, 7, 3, 2, 9, 1, 4, 7])
    pos_ids, log_q, pos_log_q = torch.tensor([3, 5, 7, 1, 9, 2]), torch.randn(9, generator=g), torch.randn(6, generator=g)
    loss = info_nce(user, pos, neg, temperature=0.2, pos_log_q=pos_log_q, neg_log_q=log_q, pos_ids=pos_ids, neg_ids=ids)
    u, p, n = (torch.nn.functional.normalize(x, dim=-1) for x in (user, pos, neg))
    per = []
    for i in range(6):
        l_pos = (u[i] @ p[i]) / 0.2 - pos_log_q[i]
        l_neg = [(u[i] @ n[j]) / 0.2 - log_q[j] for j in range(9) if ids[j] != pos_ids[i]]
        per.append(torch.logsumexp(torch.stack([l_pos, *l_neg]), 0) - l_pos)
    torch.testing.assert_close(loss, torch.stack(per).mean())


def test_queue_keeps_the_last_batches_and_round_trips():
    bank = NegativeQueue(2)
    for k in range(3):
        bank.push(torch.full((k + 2, 3), float(k), requires_grad=True) * 2, torch.arange(k + 2) + 10 * k, torch.zeros(k + 2))
    assert len(bank) == 2
    emb, ids, _ = bank.entries()
    assert not emb.requires_grad and emb.grad_fn is None
    assert ids.tolist() == [10, 11, 12, 20, 21, 22, 23]  # batches 1 and 2, oldest first
    again = NegativeQueue(2)
    again.load(bank.state())
    assert all(torch.equal(a, b) for a, b in zip(again.entries(), bank.entries()))
    again.load(NegativeQueue(2).state())
    assert len(again) == 0


def with_negatives(batch, neg_items, neg_logq):
    out = dict(batch)
    out.update(weights=(batch["items"] > 0).float(), neg_items=torch.tensor(neg_items), neg_logq=torch.tensor(neg_logq),
               pos_logq=torch.full(batch["items"].shape, -0.5), loss_scale=torch.tensor(0.1))
    return out


def test_bank_negatives_are_detached_masked_and_averaged():
    torch.manual_seed(0)
    first = with_negatives(make_batch(seed=1), [5, 12, 17, 30, 31, 38], [-1.0, -2.0, -0.5, -3.0, -1.5, -0.2])
    second = with_negatives(make_batch(seed=2), [2, 17, 21], [-0.7, -1.1, -2.2])
    positives = set(second["items"][second["items"] > 0].tolist())
    assert positives & {12, 31}  # some of the bank's items are positives of the second batch
    model = model_for(sparse_threshold=10_000)  # dense gradients, compared row by row below
    model.train()
    model.negative_queue = NegativeQueue(3)
    model(first)
    stored, ids, log_q = model.negative_queue.entries()
    assert ids.tolist() == [5, 12, 17, 30, 31, 38] and not stored.requires_grad
    torch.testing.assert_close(stored, model.item_tower(ids).detach())
    loss, _ = model(second)
    loss.backward()
    with_bank = model.item_id.weight.grad.clone()
    assert len(model.negative_queue) == 2
    # The same loss as the two sets sent as one batch (no optimizer step between: same vectors),
    # every negative's log Q raised by log 2; the bank's copy of a positive is masked too.
    model.zero_grad()
    model.negative_queue = None
    both = with_negatives(second, [2, 17, 21, 5, 12, 17, 30, 31, 38],
                          [x + math.log(2) for x in (-0.7, -1.1, -2.2, -1.0, -2.0, -0.5, -3.0, -1.5, -0.2)])
    reference, _ = model(both)
    torch.testing.assert_close(loss, reference)
    reference.backward()
    # No gradient reaches an item through the bank: rows only the bank holds get none.
    only_bank = sorted({5, 30, 38} - positives)
    assert only_bank and not with_bank[only_bank].any() and model.item_id.weight.grad[only_bank].abs().sum() > 0


# --- Training ---------------------------------------------------------------------------------------


def sampled_preset(**train_overrides) -> Preset:
    train_cfg = {**TINY_TRAIN, "in_batch_negatives": 0, **SAMPLED, "pool_negatives": 32, "queue_batches": 2, **train_overrides}
    return Preset("tiny-sampled", {**TINY_MODEL, "loss": "infonce"}, TrainConfig.from_dict(train_cfg))


def test_sampled_loss_with_pool_and_bank_learns_and_resumes_exactly(arrays, tmp_path):
    preset = sampled_preset()
    full = train(arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full")
    cut = train(arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut", stop_after=3)
    assert cut.steps == 3 and cut.losses == full.losses[:3]
    resumed = train(arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut")
    assert resumed.resumed_from == 3 and resumed.losses == full.losses  # the bank came back with the checkpoint
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("full", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["negative_queue"]["sizes"]) == 2
    longer = train(arrays, sampled_preset(max_steps=40, eval_every=0, lr=5e-3), track=track_run("1M"))
    assert np.isfinite(longer.losses).all()
    assert np.mean(longer.losses[-5:]) < 0.9 * np.mean(longer.losses[:5]), longer.losses
