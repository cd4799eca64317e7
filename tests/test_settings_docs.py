"""One source of truth for settings: the models in taac_dagster/settings.py describe every field,
the `taac` resource's run config mirrors them, the training overrides are built once, and
docs/settings.md is what the models generate."""

from __future__ import annotations

from pydantic import BaseModel

from taac_dagster.resources import TaacConfig
from taac_dagster.settings import ENV_ONLY_SETTINGS, TaacSettings, load_settings, training_overrides
from taac_dagster.settings_docs import DOC, settings_markdown


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(_fields(annotation, f"{prefix}{name}."))
        out[f"{prefix}{name}"] = info
    return out


def test_every_setting_has_a_description():
    missing = [name for name, info in _fields(TaacSettings).items() if not info.description]
    assert not missing, f"settings without a description: {missing}"


def test_the_run_config_mirrors_the_settings():
    settings = {name for name in _fields(TaacSettings) if name.split(".")[0] not in ENV_ONLY_SETTINGS}
    assert set(_fields(TaacConfig)) == settings
    for name, info in _fields(TaacConfig).items():
        assert info.description == _fields(TaacSettings)[name].description, name


def test_run_config_overrides_only_what_it_sets(tmp_path):
    config = TaacConfig(data_root=str(tmp_path), training={"preset": "baseline", "device": "cpu"}, embedding_families=[])
    assert config.overrides() == {"data_root": str(tmp_path), "embedding_families": [],
                                  "training": {"preset": "baseline", "device": "cpu"}}
    settings = config.settings("10M")
    assert settings.training.device == "cpu" and type(settings.training.device) is str
    assert settings.synthetic.seed == 10  # the track preset, untouched
    assert TaacConfig().overrides() == {}


def test_torchrun_passes_the_in_process_training_overrides(monkeypatch):
    from assets.training import torchrun_command

    monkeypatch.setenv("TAAC_TRAINING__MAX_STEPS", "30")
    monkeypatch.setenv("TAAC_TRAINING__BATCH_SIZE", "512")
    settings = load_settings("1M", {"evaluation": {"exclude_history": False}})
    command = torchrun_command(settings, "1M")
    passed = dict(command[i + 1].removeprefix("train.").split("=", 1) for i, arg in enumerate(command) if arg == "--set")
    assert passed == {key: str(value) for key, value in training_overrides(settings).items()}
    assert training_overrides(settings) == {"device": "auto", "val_users": 4096, "exclude_history": False,
                                            "max_steps": 30, "batch_size": 512}


def test_docs_settings_md_is_generated_from_the_models():
    assert DOC.read_text() == settings_markdown(), (
        "docs/settings.md differs from the settings models: run `python -m taac_dagster.settings_docs`"
    )


def test_every_model_and_training_knob_is_on_the_page_with_what_it_does():
    """One configuration story: every field of EncoderConfig and TrainConfig a preset may set
    (not the data shapes, which come from the arrays) has a row with its code default, each
    preset's value and a description taken from its comment in the source."""
    import dataclasses

    from models.encoder_config import EncoderConfig
    from models.train_config import TrainConfig
    from taac_dagster.settings_docs import field_comments, knobs_markdown

    rows = {line.split("|")[1].strip().strip("`"): line for line in knobs_markdown() if line.startswith("| `")}
    for section, cls in (("model", EncoderConfig), ("train", TrainConfig)):
        comments = field_comments(cls)
        for field in dataclasses.fields(cls):
            if comments[field.name][0] == "data shapes":
                assert f"{section}.{field.name}" not in rows
                continue
            row = rows[f"{section}.{field.name}"]
            assert row.rstrip(" |").split("|")[-1].strip(), f"{section}.{field.name} has no description"
    # The code default is the default preset's (which sets nothing); baseline sets its own.
    assert "| `train.lr` | `0.002` | `0.001` | – |" in rows["train.lr"]  # code default, baseline, default
