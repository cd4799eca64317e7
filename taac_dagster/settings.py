"""Project settings: defaults < per-track preset (configs/tracks/<track>.yaml) < environment
(``TAAC_*``, optionally from ``.env``) < explicit overrides (Dagster resource / run config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
import re

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from taac_dagster.tracks import get_track

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What DuckDB's memory_limit accepts: a number and a unit (1000- or 1024-based), or a percentage.
_MEMORY_SIZE = re.compile(r"\s*\d+(\.\d+)?\s*((K|M|G|T)i?B|B|%)\s*", re.IGNORECASE)
CONFIG_DIR = PROJECT_ROOT / "configs"


class SyntheticSettings(BaseModel):
    """Scale and shape of the generated dataset (the embedded default source)."""

    num_users: int = Field(2_000, ge=10)
    num_items: int = Field(5_000, ge=50)
    num_topics: int = Field(16, ge=2)
    mean_history: float = Field(60.0, gt=1, le=100)
    seed: int = 0
    # Dimension cap for generated embeddings: real families are up to 4096-d; tests and the
    # embedded default keep them small. None writes the real dims.
    max_embedding_dim: int | None = Field(32, ge=4)
    click_rate: float = Field(0.10, gt=0, lt=1)
    conversion_rate: float = Field(0.45, ge=0, lt=1)  # share of clicks that convert (10M)
    candidate_pool_size: int | None = Field(None, ge=10)
    cold_items: int = Field(100, ge=0)
    format: Literal["hub_parquet", "competition_jsonl"] = "hub_parquet"


class SemanticIdSettings(BaseModel):
    """RQ-KMeans Semantic IDs (models/semantic_ids.py); None picks the documented default."""

    # What the codes quantize. "content": a multi-modal family (too little coverage is an
    # error); "collaborative": item vectors learned from the training sequences; "auto":
    # content when the family covers at least min_items items, else collaborative.
    source: Literal["auto", "content", "collaborative"] = "auto"
    # None: the first of embedding_families when they are listed, else the lowest family in
    # the warehouse.
    family: int | None = None
    levels: int = Field(3, ge=1, le=8)
    # K per level. None: min(256, max(8, round(sqrt(items with an embedding)))).
    codebook_size: int | None = Field(None, ge=2)
    whiten: Literal["none", "pca"] = "none"
    whiten_dim: int | None = Field(None, ge=2)  # PCA output dim; None: min(dim, 256)
    normalize: bool = True
    niter: int = Field(20, ge=1)
    seed: int = 0
    max_train_points: int = Field(100_000, ge=100)
    # Fewer items with the family's embedding: collaborative codes (source auto) or an error
    # (source content). None: max(K, 2% of the items).
    min_items: int | None = Field(None, ge=1)
    # Collaborative item vectors (source collaborative, or auto on low coverage): a truncated
    # SVD of the PPMI of item co-occurrence within `collaborative_window` positions, over the
    # `collaborative_max_items` most frequent items (rarer items: the mean of their neighbours).
    collaborative_dim: int = Field(32, ge=2, le=256)
    collaborative_window: int = Field(3, ge=1, le=20)
    collaborative_max_items: int = Field(100_000, ge=2)


class TrainingSettings(BaseModel):
    """Encoder training (models/train.py): a preset from configs/models/ and a few overrides."""

    preset: str = "default"  # configs/models/<preset>.yaml (baseline | default)
    epochs: int | None = Field(None, ge=1)  # None: the preset's
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    # Validations without a better validation score before training stops (None: the preset's;
    # 0: never early). The best validated weights are kept either way.
    patience: int | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # torch CPU threads (None: the cores not busy, >= 1)
    # Users validated during training on the target before their test target (their training
    # sequences end before it); early stopping and the kept checkpoint follow this score.
    val_users: int = Field(4096, ge=0)
    # "in_process": train inside the asset's step. "torchrun": launch `torchrun -m models.train`
    # through Dagster Pipes (DDP over nproc_per_node processes; rank 0 reports back).
    launcher: Literal["in_process", "torchrun"] = "in_process"
    nproc_per_node: int = Field(1, ge=1)


class RetrievalSettings(BaseModel):
    """The Faiss index over the candidate pool (models/retrieval.py, models/evaluation.py)."""

    # auto: exact (flat) up to 20K items, IVF above (models.retrieval.default_index_spec).
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    nlist: int | None = Field(None, ge=1)  # IVF lists; None: ~2.5 sqrt(pool), a power of two
    nprobe: int | None = Field(None, ge=1)  # IVF starting nprobe; None: 2% of the lists (>= 16)
    hnsw_m: int = Field(32, ge=2)
    hnsw_ef_construction: int = Field(200, ge=1)
    hnsw_ef_search: int = Field(128, ge=1)
    # recall@10 of the index against exact search on a sample of real user queries (holdout
    # histories): tuned up to recall_target by raising nprobe / efSearch, and a blocking
    # check fails below recall_floor.
    recall_sample: int = Field(2000, ge=10)
    recall_target: float = Field(0.99, gt=0, le=1)
    recall_floor: float = Field(0.95, ge=0, le=1)
    tune: bool = True
    threads: int | None = Field(None, ge=1)  # Faiss threads (None: every core)
    seed: int = 0


class EvaluationSettings(BaseModel):
    """The evaluation report and the submission (models/evaluation.py)."""

    # Drop items already in the user's history from its top-10 (recorded in the report).
    exclude_history: bool = True
    query_batch_size: int = Field(4096, ge=1)  # holdout histories encoded per forward pass
    # Also score the official-baseline preset when its checkpoint exists (a model trained with
    # TAAC_TRAINING__PRESET=baseline; it lives in checkpoints/baseline/).
    baseline_preset: str | None = "baseline"
    # Score at most this many holdout users (None: every user; the report says how many).
    max_users: int | None = Field(None, ge=1)


class TaacSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TAAC_",
        env_file=".env",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_root: Path = Path("data")
    source: Literal["synthetic", "local", "hub"] = "synthetic"
    local_path: Path | None = None
    hub_repo_id: str | None = None
    # A commit sha pins the download; a branch name is resolved and the sha recorded.
    hub_revision: str = "main"
    # Never printed: repr, logs and model_dump() show '**********'.
    hub_token: SecretStr | None = None
    # Multi-modal families to read. None (the default; "auto" or "" in the environment): every
    # family the dataset holds, possibly none. A list reads exactly those ("81", "81,82",
    # "81 82" or "[81, 82]"; "none" for no family), and one the dataset lacks is an error. The
    # synthetic source writes, and the Hub source downloads, family 81 alone unless families
    # are listed (the Hub's six families are 137 GB).
    embedding_families: Annotated[list[int] | None, NoDecode] = None
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    semantic_ids: SemanticIdSettings = Field(default_factory=SemanticIdSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    max_history: int = Field(100, ge=1, le=100)
    # Quality checks validate every row of small tables and a deterministic user sample of
    # large ones (users whose id falls in the sample are validated with all their rows).
    check_sample_users: int = Field(20_000, ge=100)
    # Retraining schedule (UTC cron; default Monday 03:00) and whether it starts switched on.
    retrain_cron: str = "0 3 * * 1"
    retrain_schedule_enabled: bool = False
    duckdb_memory_limit: str = "8GB"  # per connection: a size such as 8GB, 512MiB, or a share of RAM, 50%
    duckdb_threads: int | None = Field(None, ge=1)
    # How long a step waits for its track's lock (<root>/<track>/.lock) while another run writes
    # that track, before it stops with an error naming the holder; 0 refuses at once.
    track_lock_timeout: float = Field(3600.0, ge=0)

    @field_validator("duckdb_memory_limit")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        if not _MEMORY_SIZE.fullmatch(value):
            raise ValueError(
                f"duckdb_memory_limit {value!r}: expected a size such as 8GB, 512MB, 1.5GiB or a share of RAM such as 50%"
            )
        return value.strip()

    @field_validator("embedding_families", mode="before")
    @classmethod
    def _split_families(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "auto"):
                return None
            if text == "none":
                return []
            return [int(part) for part in text.strip("[]").replace(",", " ").split()]
        if isinstance(value, int):
            return [value]
        return value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def track_preset(track: str) -> dict[str, Any]:
    get_track(track)
    path = CONFIG_DIR / "tracks" / f"{track}.yaml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def load_settings(track: str, overrides: dict[str, Any] | None = None) -> TaacSettings:
    """Settings for one track, merged in the documented order."""
    from_env = TaacSettings().model_dump(exclude_unset=True)
    merged = _deep_merge(_deep_merge(track_preset(track), from_env), overrides or {})
    return TaacSettings.model_validate(merged)
