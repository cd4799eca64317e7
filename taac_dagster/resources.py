"""The settings resource: project settings for a track, with run-level overrides on top."""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from taac_dagster.paths import TrackPaths
from taac_dagster.settings import TaacSettings, load_settings


_SECTIONS = ("synthetic", "semantic_ids", "training", "retrieval", "evaluation")


class TaacConfig(ConfigurableResource):
    """Overrides of the TAAC_* settings for the runs that use this resource.

    Fields left unset fall back to the environment (``TAAC_*``, ``.env``) and the track's
    preset in ``configs/tracks/``; see ``taac_dagster.settings``.
    """

    data_root: str | None = Field(default=None, description="Root folder of all artifacts")
    source: str | None = Field(default=None, description="synthetic | local | hub")
    local_path: str | None = Field(default=None, description="Existing dataset copy (local source)")
    hub_revision: str | None = Field(default=None, description="Hub revision to download")
    embedding_families: list[int] | None = Field(
        default=None, description="Multi-modal families to use ([] for none; unset: the setting, auto by default)"
    )
    synthetic_seed: int | None = Field(default=None, description="Seed of the generated dataset")
    synthetic_num_users: int | None = None
    synthetic_num_items: int | None = None
    semantic_ids_source: str | None = Field(
        default=None, description="Semantic ID vectors: auto | content | collaborative"
    )
    training_preset: str | None = Field(default=None, description="Model preset: default | baseline | a YAML path")
    training_epochs: int | None = None
    training_max_steps: int | None = None
    training_device: str | None = Field(default=None, description="auto | cpu | cuda")
    retrieval_index: str | None = Field(default=None, description="auto | flat | ivf | hnsw")
    retrieval_nprobe: int | None = None
    retrieval_recall_floor: float | None = Field(default=None, description="Blocking check floor of recall@10")
    evaluation_exclude_history: bool | None = Field(default=None, description="Filter history items from the top-10")
    evaluation_max_users: int | None = Field(default=None, description="Score a sample of this many holdout users")

    def overrides(self) -> dict[str, Any]:
        """Set fields as nested settings: ``training_preset`` -> ``{"training": {"preset": ...}}``."""
        top: dict[str, Any] = {
            key: getattr(self, key)
            for key in ("data_root", "source", "local_path", "hub_revision", "embedding_families")
            if getattr(self, key) is not None
        }
        for section in _SECTIONS:
            values = {
                name[len(section) + 1 :]: getattr(self, name)
                for name in type(self).model_fields
                if name.startswith(f"{section}_") and getattr(self, name) is not None
            }
            if values:
                top[section] = values
        return top

    def settings(self, track: str) -> TaacSettings:
        return load_settings(track, self.overrides())

    def paths(self, track: str) -> TrackPaths:
        return TrackPaths(self.settings(track).data_root, track)
