"""The ``taac`` resource: the project settings of a track, with run-level overrides on top.

Its run config is derived from the settings models (``taac_dagster.settings``), section by
section, so a setting is declared once: every field of ``TaacSettings`` (but the two the
definitions read when they load) is an optional field here, with the same name, nesting and
description, unset by default. A run config overrides only what it sets::

    resources:
      taac:
        config:
          training: {preset: baseline, epochs: 2}
          retrieval: {index: ivf}

Everything else falls back to the environment (``TAAC_*``, ``.env``) and the track's preset
in ``configs/tracks/``. A secret (``hub_token``) is never a value here, only where to read it
(``{env: HF_TOKEN}``, ``{file: /run/secrets/hf_token}``): Dagster stores a run's config and shows it.
The resource is also the assets' one way to DuckDB: ``duckdb()``
opens a connection with the memory and thread settings of the track, as every connection of
the plain code does (``taac_dagster.db.connect``).
"""

from __future__ import annotations

import enum
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import duckdb
from dagster import Config, ConfigurableResource, EnvVar
from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, field_validator

from taac_dagster.db import connect
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import ENV_ONLY_SETTINGS, TaacSettings, load_settings


class SecretSource(Config):
    """Where the run reads a secret when it starts: an environment variable or a file, never the
    secret itself, which Dagster would store with the run and show in the UI."""

    env: Optional[str] = Field(None, description="The environment variable holding it, e.g. `HF_TOKEN`.")  # noqa: UP045
    file: Optional[str] = Field(None, description="The file holding it, e.g. a mounted `/run/secrets/hf_token`.")  # noqa: UP045

    def read(self, setting: str) -> str:
        if (self.env is None) == (self.file is None):
            raise ValueError(f"{setting}: give exactly one of env (a variable's name) and file (a path)")
        if self.env is not None:
            if not os.environ.get(self.env):
                raise ValueError(f"{setting}: the environment variable {self.env} is not set")
            return os.environ[self.env]
        file = str(self.file)  # set: exactly one of the two is, and env is not
        try:
            return Path(file).expanduser().read_text().strip()
        except OSError as error:
            raise ValueError(f"{setting}: cannot read the file {self.file} ({error.strerror or error})") from None


def _config_type(annotation: Any, name: str) -> Any:
    """The Dagster config type of a settings field's type: Literal -> an Enum of its values (the
    Launchpad offers them), Path -> str, SecretStr -> SecretSource, X | None -> X."""
    if get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        [annotation] = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return enum.Enum(name, {value: value for value in values}, type=str, module=__name__)
    if annotation is SecretStr:
        return SecretSource
    if annotation is Path:
        return str
    return annotation


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def run_config_model(
    settings_model: type[BaseModel], name: str, *, base: type[Config] = Config, skip: frozenset[str] = frozenset()
) -> type[Config]:
    """A Dagster config class mirroring ``settings_model``: every field optional and unset by
    default, sections nested, descriptions kept."""
    fields: dict[str, Any] = {}
    for field_name, info in settings_model.model_fields.items():
        if field_name in skip:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            section = run_config_model(annotation, f"{_camel(field_name)}RunConfig")
            fields[field_name] = (section, Field(default_factory=section, description=info.description))
        else:
            config_type = _config_type(annotation, f"{name}{_camel(field_name)}")
            fields[field_name] = (Optional[config_type], Field(None, description=info.description))  # noqa: UP045 (a runtime type)
    return create_model(name, __base__=base, __module__=__name__, __doc__=settings_model.__doc__, **fields)


def set_values(config: BaseModel) -> dict[str, Any]:
    """The fields a run config sets, nested like the settings (unset fields and empty sections left out)."""
    values: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, EnvVar):  # set in Python and read outside a run, where Dagster has not resolved it
            value = SecretSource(env=value.env_var_name, file=None)
        if isinstance(value, SecretSource):
            value = value.read(name)
        elif isinstance(value, BaseModel):
            value = set_values(value)
            if not value:
                continue
        elif value is None:
            continue
        elif isinstance(value, enum.Enum):
            value = value.value
        values[name] = value
    return values


# The run config's fields, one per setting (see the module doc).
_TaacRunConfig = run_config_model(TaacSettings, "TaacRunConfig", base=ConfigurableResource, skip=ENV_ONLY_SETTINGS)


class TaacConfig(_TaacRunConfig):  # type: ignore[misc,valid-type]  # fields derived from TaacSettings
    """Overrides of the TAAC_* settings for the runs that use this resource (fields left unset
    fall back to the environment and the track's preset; see docs/settings.md)."""

    model_config = ConfigDict(hide_input_in_errors=True)  # an error must not show a token it refuses

    @field_validator("hub_token", mode="before")
    @classmethod
    def _no_literal_secret(cls, value: Any) -> Any:
        if isinstance(value, EnvVar):  # Dagster puts the EnvVar itself back after validation (see set_values)
            return {"env": value.env_var_name}
        if isinstance(value, str):
            raise ValueError(
                "hub_token must not be written into run config: Dagster stores a run's config and shows it in the UI. "
                "Set TAAC_HUB_TOKEN (or HF_TOKEN) in the environment of the Dagster processes, or say where the run reads "
                "it: `hub_token: {env: HF_TOKEN}`, `hub_token: {file: /run/secrets/hf_token}` (EnvVar(\"HF_TOKEN\") in "
                "Python)."
            )
        return value

    def overrides(self) -> dict[str, Any]:
        """The settings this run config sets, nested as in ``TaacSettings``."""
        return set_values(self)

    def settings(self, track: str) -> TaacSettings:
        return load_settings(track, self.overrides())

    def paths(self, track: str) -> TrackPaths:
        return TrackPaths(self.settings(track).data_root, track)

    def duckdb(self, track: str, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A connection to the track's warehouse with the track's DuckDB memory and thread settings."""
        settings = self.settings(track)
        return connect(TrackPaths(settings.data_root, track).warehouse, settings, read_only=read_only)
