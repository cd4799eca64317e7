"""Encoders trained side by side (models/encoder_ensemble.py) and how many the data gets."""

from __future__ import annotations

import pytest
import torch

from models.auto_settings import choose_members, resolve_model_settings
from models.encoder import Encoder
from models.encoder_ensemble import EncoderEnsemble, build_encoder
from models.train_config import TrainConfig
from tests.test_encoder import make_batch, small_config, small_tables

# Prepared arrays' figures: Amazon Toys under the published protocol, and the 1M track's release.
TOYS = {"num_sequences": 19_412, "num_events": 128_007, "num_softmax_rows": 11_925, "num_item_rows": 11_925,
        "max_len": 100, "id_rows": 11_925}
RELEASE_1M = {"num_sequences": 1_001_845, "num_events": 91_000_000, "num_softmax_rows": 4_783_154,
              "num_item_rows": 4_783_154, "max_len": 100, "id_rows": 4_783_154}


def ensemble(members: int = 3) -> Encoder:
    torch.manual_seed(0)
    model = build_encoder(small_config(members=members)).attach(small_tables())
    for member in model.members if isinstance(model, EncoderEnsemble) else [model]:
        with torch.no_grad():
            member.item_id.weight[1:].normal_(std=0.1)
    return model.eval()


def test_one_member_is_a_plain_encoder_and_member_zero_starts_like_it():
    assert type(build_encoder(small_config())) is Encoder
    torch.manual_seed(5)
    single = build_encoder(small_config())
    torch.manual_seed(5)
    pair = build_encoder(small_config(members=2))
    assert isinstance(pair, EncoderEnsemble) and len(pair.members) == 2
    first, second = pair.members[0].state_dict(), pair.members[1].state_dict()
    assert all(torch.equal(single.state_dict()[k], first[k]) for k in first)
    # The second member starts elsewhere: an ensemble of copies would average nothing.
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], second["blocks.0.attn.qkv.weight"])


def test_the_joined_vectors_score_the_mean_of_the_members_cosines():
    model = ensemble(3)
    batch = make_batch()
    rows = torch.arange(1, 20)
    users, items = model.user_vectors(batch, (1,)), model.item_vectors(rows)
    assert users.shape == (3, 48) and items.shape == (19, 48) and model.cfg.vector_dim == 48
    torch.testing.assert_close(users.norm(dim=1), torch.ones(3))
    members = [(m.user_vectors(batch, (1,)) @ m.item_vectors(rows).T) for m in model.members]
    torch.testing.assert_close(users @ items.T, torch.stack(members).mean(0))


def test_the_loss_is_the_sum_of_the_members_losses():
    model = ensemble(2)
    batch = make_batch()
    batch["weights"] = (batch["items"] > 0).float()
    batch["loss_scale"] = torch.tensor(1.0)
    for member in model.members:
        member.cfg.loss = "softmax"
    total, _ = model(batch)
    parts = [member(batch)[0] for member in model.members]
    torch.testing.assert_close(total, parts[0] + parts[1])
    total.backward()
    assert all(p.grad is not None for member in model.members for p in member.blocks.parameters())


def test_an_ensemble_refuses_a_dot_product_and_a_negative_queue():
    with pytest.raises(ValueError, match="cosine"):
        build_encoder(small_config(members=2, similarity="dot"))
    model = ensemble(2)
    model.negative_queue = object()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="queue_batches"):
        model(make_batch())


def test_small_data_gets_members_and_a_large_release_one_model():
    """The sequence budget (4M) over 40 passes: Toys' 19,412 sequences could pay for five
    members (capped at three); the 1M release's budget is four passes, one model's worth."""
    tc = TrainConfig()
    assert choose_members({}, tc, TOYS)[0] == 3
    assert choose_members({}, tc, RELEASE_1M)[0] == 1
    assert choose_members({}, tc, {**TOYS, "num_sequences": 50_000})[0] == 2
    assert choose_members({}, TrainConfig(max_members=5), TOYS)[0] == 5
    # A run whose length is fixed by epochs or steps is counted by them.
    assert choose_members({}, TrainConfig(epochs=3), TOYS)[0] == 1
    assert choose_members({}, TrainConfig(epochs=100), TOYS)[0] == 2
    assert choose_members({}, TrainConfig(max_steps=20, batch_size=64), TOYS)[0] == 1
    # Each member holds an id table with its two Adam moments: no more than max_id_table_bytes holds.
    one_table = 3 * 4 * 64 * TOYS["id_rows"]
    assert choose_members({}, TrainConfig(max_id_table_bytes=2 * one_table + 1), TOYS)[0] == 2
    # What an ensemble cannot average stays a single model.
    assert choose_members({"similarity": "dot"}, tc, TOYS)[0] == 1
    assert choose_members({"loss": "infonce"}, TrainConfig(queue_batches=4), TOYS)[0] == 1


def test_members_are_auto_unless_the_preset_sets_them():
    tc = TrainConfig()
    assert resolve_model_settings({}, tc, TOYS)["members"] == 3
    assert resolve_model_settings({"members": "auto"}, tc, RELEASE_1M)["members"] == 1
    assert resolve_model_settings({"members": 1}, tc, TOYS)["members"] == 1
