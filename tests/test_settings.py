from __future__ import annotations

import pytest

from taac_dagster.errors import UnknownTrackError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
from taac_dagster.tracks import get_track


def test_merge_order(monkeypatch, tmp_path):
    settings = load_settings("10M")
    assert settings.source == "synthetic" and settings.hub_repo_id == "TAAC2025/TencentGR-10M"
    assert settings.synthetic.seed == 10  # from configs/tracks/10M.yaml
    monkeypatch.setenv("TAAC_SYNTHETIC__NUM_ITEMS", "777")
    monkeypatch.setenv("TAAC_EMBEDDING_FAMILIES", "81,82")
    settings = load_settings("10M", {"data_root": str(tmp_path), "synthetic": {"num_users": 50}})
    assert settings.synthetic.num_items == 777  # environment beats the preset
    assert settings.synthetic.seed == 10  # the preset survives a partial env override
    assert settings.synthetic.num_users == 50  # explicit overrides beat everything
    assert settings.embedding_families == [81, 82]
    assert settings.data_root == tmp_path


def test_unknown_track_is_refused():
    with pytest.raises(UnknownTrackError, match="unknown track '5M': expected one of 1M, 10M"):
        load_settings("5M")
    with pytest.raises(UnknownTrackError):
        TrackPaths("data", "100M")
    assert get_track("10M").weighted and not get_track("1M").weighted


def test_invalid_source_is_refused(monkeypatch):
    monkeypatch.setenv("TAAC_SOURCE", "ftp")
    with pytest.raises(ValueError, match="synthetic"):
        load_settings("1M")


@pytest.mark.parametrize(
    ("env", "families"),
    [(None, None), ("auto", None), ("", None), ("AUTO", None), ("none", []), ("81", [81]), ("[81, 83]", [81, 83])],
)
def test_embedding_families_default_to_auto(monkeypatch, env, families):
    """Unset, "auto" or empty: every family the dataset holds (None); "none": no family."""
    if env is not None:
        monkeypatch.setenv("TAAC_EMBEDDING_FAMILIES", env)
    for track in ("1M", "10M"):  # no track preset pins a family
        assert load_settings(track).embedding_families == families


def test_semantic_id_source_from_the_environment_and_the_run_config(monkeypatch):
    from taac_dagster.resources import TaacConfig

    assert load_settings("1M").semantic_ids.source == "auto"
    monkeypatch.setenv("TAAC_SEMANTIC_IDS__SOURCE", "content")
    assert load_settings("1M").semantic_ids.source == "content"
    assert TaacConfig(semantic_ids={"source": "collaborative"}).settings("1M").semantic_ids.source == "collaborative"
    with pytest.raises(ValueError, match="collaborative"):
        TaacConfig(semantic_ids={"source": "text"}).settings("1M")


def test_run_config_takes_where_to_read_the_hub_token_never_the_token(monkeypatch, tmp_path):
    import dagster as dg
    from pydantic import ValidationError

    from taac_dagster.resources import TaacConfig

    monkeypatch.setenv("MY_HF_TOKEN", "hf_from_env")
    (tmp_path / "token").write_text("hf_from_file\n")
    assert TaacConfig(hub_token={"env": "MY_HF_TOKEN"}).settings("1M").hub_token.get_secret_value() == "hf_from_env"
    assert TaacConfig(hub_token={"file": str(tmp_path / "token")}).settings("1M").hub_token.get_secret_value() == "hf_from_file"
    assert TaacConfig(hub_token=dg.EnvVar("MY_HF_TOKEN")).settings("1M").hub_token.get_secret_value() == "hf_from_env"
    with pytest.raises(ValidationError, match=r"must not be written into run config.*TAAC_HUB_TOKEN.*\{env: HF_TOKEN\}") as refused:
        TaacConfig(hub_token="hf_literal")
    assert "hf_literal" not in str(refused.value)
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE is not set"):
        TaacConfig(hub_token={"env": "NOT_SET_ANYWHERE"}).settings("1M")

    @dg.op(required_resource_keys={"taac"})
    def token(context) -> str:
        return context.resources.taac.settings("1M").hub_token.get_secret_value()

    @dg.job(resource_defs={"taac": TaacConfig()})
    def job():
        token()

    def run(value):
        return job.execute_in_process(run_config={"resources": {"taac": {"config": {"hub_token": value}}}})

    assert run({"env": "MY_HF_TOKEN"}).output_for_node("token") == "hf_from_env"
    # A literal is refused when the run config is checked, before Dagster stores the run.
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"hub_token must be dict.*env.*file"):
        run("hf_literal")


@pytest.mark.parametrize(
    ("preset", "phrase"),
    [
        ("arrays", "checkpoints/arrays/"),  # would train into the arrays' folder
        ("rejected", "indexes/rejected/"),
        ("Default", "lower-case letters"),
        ("../default", "lower-case letters"),
        ("no_such_preset", "the presets available: baseline, default"),
    ],
)
def test_a_model_preset_must_name_its_own_folders_and_exist(preset, phrase):
    with pytest.raises(ValueError, match=f"{preset!r}.*{phrase}|{phrase}"):
        load_settings("1M", {"training": {"preset": preset}})


def test_the_baseline_preset_is_a_folder_name_too():
    assert load_settings("1M", {"evaluation": {"baseline_preset": ""}}).evaluation.baseline_preset == ""
    with pytest.raises(ValueError, match="indexes/rejected/"):
        load_settings("1M", {"evaluation": {"baseline_preset": "rejected"}})


def test_model_knobs_merge_code_default_then_preset_then_settings(monkeypatch, tmp_path):
    """The training knobs' one story: the code default (models/train_config.py), under a model
    preset's value, under the settings that override a preset (environment, then run config)."""
    from models.train_config import TrainConfig
    from taac_dagster.settings import training_overrides
    from taac_dagster.steps.training import load_preset

    preset = tmp_path / "mine.yaml"
    preset.write_text("model: {d_model: 32}\ntrain: {batch_size: 64, lr: 0.0005}\n")
    assert load_preset(preset).train.batch_size == 64 and load_preset(preset).train.lr == 0.0005
    assert load_preset(preset).train.weight_decay == TrainConfig().weight_decay == 0.01  # the code default
    assert load_preset("default").train == TrainConfig()  # the default preset sets nothing of its own
    monkeypatch.setenv("TAAC_TRAINING__BATCH_SIZE", "32")
    from_env = load_preset(preset, {"train": training_overrides(load_settings("1M"))}).train
    assert (from_env.batch_size, from_env.lr) == (32, 0.0005)  # the environment beats the preset, lr stays
    from_run = load_preset(preset, {"train": training_overrides(load_settings("1M", {"training": {"batch_size": 16}}))}).train
    assert from_run.batch_size == 16  # the run config beats the environment
    assert load_preset(preset).model == {"d_model": 32}  # model knobs come from the preset alone
