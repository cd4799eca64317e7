"""The settings resource: project settings for a track, with run-level overrides on top."""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings, load_settings


class TaacConfig(ConfigurableResource):
    """Overrides of the TAAC_* settings for the runs that use this resource.

    Fields left unset fall back to the environment (``TAAC_*``, ``.env``) and the track's
    preset in ``configs/tracks/``; see ``taac_dagster.settings``.
    """

    data_root: str | None = Field(default=None, description="Root folder of all artifacts")
    source: str | None = Field(default=None, description="synthetic | local | hub")
    local_path: str | None = Field(default=None, description="Existing dataset copy (local source)")
    hub_revision: str | None = Field(default=None, description="Hub revision to download")
    embedding_families: list[int] | None = Field(default=None, description="Multi-modal families to use")
    synthetic_seed: int | None = Field(default=None, description="Seed of the generated dataset")
    synthetic_num_users: int | None = None
    synthetic_num_items: int | None = None

    def overrides(self) -> dict[str, Any]:
        top = {
            key: getattr(self, key)
            for key in ("data_root", "source", "local_path", "hub_revision", "embedding_families")
            if getattr(self, key) is not None
        }
        synthetic = {
            key: getattr(self, f"synthetic_{key}")
            for key in ("seed", "num_users", "num_items")
            if getattr(self, f"synthetic_{key}") is not None
        }
        if synthetic:
            top["synthetic"] = synthetic
        return top

    def settings(self, track: str) -> TaacSettings:
        return load_settings(track, self.overrides())

    def paths(self, track: str) -> TrackPaths:
        return TrackPaths(self.settings(track).data_root, track)
