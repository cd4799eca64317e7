"""Ensembles of encoders (models/encoder_ensemble.py) and how many members the data gets."""

from __future__ import annotations

import pytest
import torch

from models.auto_settings import choose_members
from models.encoder import Encoder
from models.encoder_ensemble import EncoderEnsemble, build_encoder
from models.ensemble_training import member_preset
from models.train_config import Preset, TrainConfig
from tests.test_encoder import make_batch, small_config, small_tables

# Prepared arrays' figures: Amazon Toys under the published protocol, and the 1M track's release.
TOYS = {"num_sequences": 19_412, "num_events": 128_007, "num_softmax_rows": 11_925, "num_item_rows": 11_925,
        "max_len": 100, "id_rows": 11_925}
RELEASE_1M = {"num_sequences": 1_001_845, "num_events": 91_000_000, "num_softmax_rows": 4_783_154,
              "num_item_rows": 4_783_154, "max_len": 100, "id_rows": 4_783_154}


def trained_like(seed: int) -> Encoder:
    """An encoder with its own random weights (non-zero ids, so the id path counts)."""
    torch.manual_seed(seed)
    model = Encoder(small_config())
    with torch.no_grad():
        model.item_id.weight[1:].normal_(std=0.1)
    return model.attach(small_tables()).eval()


def test_one_member_is_a_plain_encoder():
    assert type(build_encoder(small_config())) is Encoder
    assert isinstance(build_encoder(small_config(members=2)), EncoderEnsemble)


def test_the_joined_vectors_score_the_mean_of_the_members_cosines():
    members = [trained_like(seed) for seed in range(3)]
    model = EncoderEnsemble.of(members).attach(small_tables()).eval()
    batch, rows = make_batch(), torch.arange(1, 20)
    users, items = model.user_vectors(batch, (1,)), model.item_vectors(rows)
    assert users.shape == (3, 48) and items.shape == (19, 48) and model.cfg.vector_dim == 48
    torch.testing.assert_close(users.norm(dim=1), torch.ones(3))
    scores = [m.user_vectors(batch, (1,)) @ m.item_vectors(rows).T for m in members]
    torch.testing.assert_close(users @ items.T, torch.stack(scores).mean(0))
    # The members' scores differ (else the mean would be any one of them).
    assert not torch.allclose(scores[0], scores[1])
    # Rebuilt from its config and state dict alone, as a checkpoint is read.
    again = build_encoder(model.cfg)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.attach(small_tables()).eval().item_vectors(rows), items)


def test_an_ensemble_refuses_a_dot_product_mixed_members_and_training_as_one():
    with pytest.raises(ValueError, match="cosine"):
        build_encoder(small_config(members=2, similarity="dot"))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="one configuration"):
        EncoderEnsemble.of([trained_like(0), Encoder(small_config(d_model=8, n_heads=1))])
    with pytest.raises(NotImplementedError, match="one at a time"):
        EncoderEnsemble.of([trained_like(0), trained_like(1)])(make_batch())


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
    # The members' id tables score together: no more of them than max_id_table_bytes holds.
    one_table = 4 * 64 * TOYS["id_rows"]
    assert choose_members({}, TrainConfig(max_id_table_bytes=2 * one_table + 1), TOYS)[0] == 2
    # id_buckets auto (or unset) counts one row per item; a number counts its rows.
    assert choose_members({"id_buckets": "auto"}, tc, TOYS)[0] == 3
    assert choose_members({"id_buckets": 100}, TrainConfig(max_id_table_bytes=2 * 4 * 64 * 100 + 1), TOYS)[0] == 2
    # A dot product is not a cosine: the mean of the members' scores is not what it ranks by.
    assert choose_members({"similarity": "dot"}, tc, TOYS)[0] == 1


def test_each_member_is_the_preset_with_its_seed_and_its_share_of_the_time_budget():
    preset = Preset("default", {"d_model": 32}, TrainConfig(seed=7, max_minutes=30, lr=1e-3))
    member = member_preset(preset, 2, 3)
    assert member.model == {"d_model": 32, "members": 1} and member.name == "default"
    assert member.train.seed == 9 and member.train.max_minutes == 10 and member.train.lr == 1e-3
    assert member_preset(Preset("p", {}, TrainConfig()), 1, 2).train.max_minutes is None
