"""Project settings: defaults < per-track preset (configs/tracks/<track>.yaml) < environment
(``TAAC_*``, optionally from ``.env``) < explicit overrides (Dagster resource / run config).

The models below are the one declaration of every setting: the ``taac`` resource's run config
(``taac_dagster.resources``) and the settings tables in ``docs/settings.md``
(``taac_dagster.settings_docs``) are derived from them, so every field carries a ``description``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from taac_dagster.tracks import get_track

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What DuckDB's memory_limit accepts: a number and a unit (1000- or 1024-based), or a percentage.
_MEMORY_SIZE = re.compile(r"\s*\d+(\.\d+)?\s*((K|M|G|T)i?B|B|%)\s*", re.IGNORECASE)
CONFIG_DIR = PROJECT_ROOT / "configs"
# Read when the definitions load (the schedule), not per run: no run-config field.
ENV_ONLY_SETTINGS = frozenset({"retrain_cron", "retrain_schedule_enabled"})
MODEL_PRESET_DIR = CONFIG_DIR / "models"
# A model preset's name is also its folders' (checkpoints/<name>/, indexes/<name>/, vectors/<name>/),
# beside checkpoints/arrays/ (taac_dagster/steps/arrays.py) and indexes/rejected/ (taac_dagster/steps/index.py).
_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
PRESET_FOLDERS_TAKEN = frozenset({"arrays", "rejected"})
# Defaults of hub_timeout_seconds and hub_deadline_seconds, also those of sources.hub.download_hub_dataset.
HUB_TIMEOUT_SECONDS = 60.0
HUB_DEADLINE_SECONDS = 12 * 3600.0


def model_preset_name(name_or_path: str | Path) -> str:
    """A model preset's name (a YAML path's stem); a ValueError when it cannot name the preset's folders."""
    path = Path(name_or_path)
    name = path.stem if path.suffix else str(name_or_path)
    if not _PRESET_NAME.fullmatch(name):
        raise ValueError(
            f"model preset {str(name_or_path)!r}: its name {name!r} also names its folders (checkpoints/<name>/, "
            "indexes/<name>/), so it must be lower-case letters, digits, '_' and '-', starting with a letter or digit"
        )
    if name in PRESET_FOLDERS_TAKEN:
        raise ValueError(
            f"model preset {name!r} would share its folders with the artifacts in checkpoints/arrays/ and "
            f"indexes/rejected/: rename it (names taken: {', '.join(sorted(PRESET_FOLDERS_TAKEN))})"
        )
    return name


def model_preset_file(name_or_path: str | Path) -> Path:
    """``configs/models/<name>.yaml`` for a name, the file itself for a YAML path; a
    FileNotFoundError naming the available presets when it does not exist."""
    model_preset_name(name_or_path)
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no model preset {path}; the presets available: {known}")
    return path


class SyntheticSettings(BaseModel):
    """Scale and shape of the generated dataset (the embedded default source)."""

    num_users: int = Field(2_000, ge=10, description="Users generated.")
    num_items: int = Field(5_000, ge=50, description="Items (ads) generated.")
    num_topics: int = Field(16, ge=2, description="Latent topics planted in users' interests and items.")
    mean_history: float = Field(60.0, gt=1, le=100, description="Mean history length of a user (events).")
    seed: int = Field(0, description="Seed of the generator: the same seed and scale write the same dataset.")
    max_embedding_dim: int | None = Field(
        32, ge=4, description="Dimension cap of the generated embeddings (real families are up to 4096-d); "
        "unset: the real dimensions."
    )
    click_rate: float = Field(0.10, gt=0, lt=1, description="Share of events that are clicks.")
    conversion_rate: float = Field(0.45, ge=0, lt=1, description="Share of clicks that convert (10M track only).")
    candidate_pool_size: int | None = Field(
        None, ge=10, description="Items in the candidate pool; unset: chosen from the catalogue size."
    )
    cold_items: int = Field(100, ge=0, description="Candidates that never occur in a sequence (cold start).")
    format: Literal["hub_parquet", "competition_jsonl"] = Field(
        "hub_parquet", description="On-disk format written: the Hub release's parquet or the competition's JSON lines."
    )


class SemanticIdSettings(BaseModel):
    """RQ-KMeans Semantic IDs (models/semantic_ids.py); unset fields pick the documented default."""

    source: Literal["auto", "content", "collaborative"] = Field(
        "auto", description="What the codes quantize: `content` (a multi-modal family; too little coverage is an "
        "error), `collaborative` (item vectors learned from the training sequences) or `auto` (content when the "
        "family covers at least `min_items` items, else collaborative)."
    )
    family: int | None = Field(
        None, description="Content family; unset: the first of `embedding_families` when listed, else the "
        "lowest family in the warehouse."
    )
    levels: int = Field(3, ge=1, le=8, description="Residual quantization levels.")
    codebook_size: int | None = Field(
        None, ge=2, description="Codes per level (K); unset: min(256, max(8, round(sqrt(items with a vector))))."
    )
    whiten: Literal["none", "pca"] = Field("none", description="Whitening of the vectors before k-means.")
    whiten_dim: int | None = Field(None, ge=2, description="PCA output dimension; unset: min(dim, 256).")
    normalize: bool = Field(True, description="L2-normalize the vectors before quantizing.")
    niter: int = Field(20, ge=1, description="k-means iterations per level.")
    seed: int = Field(0, description="Seed of the training subsample, k-means and the SVD.")
    max_train_points: int = Field(
        100_000, ge=100, description="Deterministic subsample for PCA and k-means (every item is encoded)."
    )
    min_items: int | None = Field(
        None, ge=1, description="Items the content family must cover for content codes; unset: max(K, 2% of the items)."
    )
    collaborative_dim: int = Field(
        32, ge=2, le=256, description="Dimension of the collaborative vectors (truncated SVD of the PPMI)."
    )
    collaborative_window: int = Field(3, ge=1, le=20, description="Co-occurrence window, in positions.")
    collaborative_max_items: int = Field(
        100_000, ge=2, description="Vocabulary of the co-occurrence matrix (most frequent items; rarer ones are folded in)."
    )


class TrainingSettings(BaseModel):
    """Encoder training (models/train.py, taac_dagster/steps/training.py): a preset from configs/models/ and a few overrides."""

    preset: str = Field("default", description="Model preset: `default`, `baseline` (the official baseline) "
                        "or a YAML path (`configs/models/<preset>.yaml`).")
    epochs: int | None = Field(None, ge=1, description="Most epochs; unset: the preset's (`default`: from the data, "
                               "ended by early stopping).")
    max_steps: int | None = Field(None, ge=1, description="Most optimizer steps; overrides `epochs`.")
    max_minutes: float | None = Field(
        None, gt=0, description="Time budget of the training loop, in minutes (validations and checkpoints "
        "included); unset: none. After 40 steps the run measures its speed and plans the steps that fit (at most "
        "the planned ones): warm-up, learning-rate schedule and validation interval follow that length."
    )
    checkpoint_minutes: float | None = Field(
        None, ge=0, description="Write the resumable checkpoint at least this often, in minutes (0: only at the "
        "end and every `checkpoint_every` steps of the preset); unset: the preset's (5)."
    )
    patience: int | None = Field(
        None, ge=0, description="Validations without a better score before training stops (0: never early); unset: "
        "the preset's. The best validated weights are kept either way."
    )
    batch_size: int | None = Field(None, ge=1, description="Global batch (sequences per step, over all ranks); "
                                   "unset: the preset's.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train (`auto`: CUDA when present).")
    threads: int | None = Field(None, ge=1, description="Torch CPU threads; unset: the cores the load average leaves "
                                "free (at least one).")
    val_users: int = Field(
        4096, ge=0, description="Users validated during training on the target before their test target (their "
        "training sequences end before it); early stopping follows this score."
    )
    launcher: Literal["in_process", "torchrun"] = Field(
        "in_process", description="`in_process`: train inside the asset's step; `torchrun`: launch `torchrun -m "
        "taac_dagster.steps.train_cli` through Dagster Pipes (DDP, rank 0 reports back)."
    )
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node with the torchrun launcher.")

    @field_validator("preset")
    @classmethod
    def _existing_preset(cls, value: str) -> str:
        try:  # now, not after the arrays are prepared
            model_preset_file(value)
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
        return value


class RetrievalSettings(BaseModel):
    """The Faiss index over the candidate pool (models/retrieval.py, taac_dagster/steps/index.py)."""

    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="Index type; `auto`: exact (flat) up to 20K items, IVF above."
    )
    nlist: int | None = Field(None, ge=1, description="IVF lists; unset: ~2.5 sqrt(pool), a power of two.")
    nprobe: int | None = Field(None, ge=1, description="IVF lists searched (where tuning starts); unset: tuned from "
                               "1/256 of the lists (2% without tuning).")
    hnsw_m: int = Field(32, ge=2, description="HNSW links per node.")
    hnsw_ef_construction: int = Field(200, ge=1, description="HNSW efConstruction.")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW efSearch (where tuning starts).")
    recall_sample: int = Field(2000, ge=10, description="Holdout queries on which recall@10 against exact search "
                               "is measured.")
    recall_target: float = Field(0.99, gt=0, le=1, description="recall@10 that tuning raises nprobe / efSearch to.")
    recall_floor: float = Field(0.95, ge=0, le=1, description="The blocking check fails below this recall@10; "
                                "such an index is not published.")
    tune: bool = Field(True, description="Tune nprobe / efSearch up to `recall_target` on the sample.")
    threads: int | None = Field(None, ge=1, description="Faiss threads; unset: every core.")
    seed: int = Field(0, description="Seed of the IVF training and of the recall sample.")


class EvaluationSettings(BaseModel):
    """The evaluation report and the submission (taac_dagster/steps/report.py, taac_dagster/steps/submission.py)."""

    exclude_history: bool = Field(True, description="Drop items already in the user's history from its top-10 "
                                  "(as the official evaluation does; stated in the report).")
    query_batch_size: int = Field(4096, ge=1, description="Holdout histories encoded per forward pass.")
    baseline_preset: str | None = Field(
        "baseline", description="Also score this preset when its checkpoint exists (`checkpoints/<preset>/`); "
        "empty to skip."
    )
    max_users: int | None = Field(None, ge=1, description="Score a deterministic sample of this many holdout "
                                  "users; unset: every user.")
    search_backend: Literal["auto", "faiss", "torch"] = Field(
        "auto", description="What searches the index for the report's and the submission's top-10: `faiss` (CPU), "
        "`torch` (exact matmul + top-k on the compute device, over the index's vectors); `auto`: torch (exact) when the "
        "compute device is CUDA, whatever the index kind; faiss on a CPU. Recorded as `search_backend`."
    )

    @field_validator("baseline_preset")
    @classmethod
    def _preset_name(cls, value: str | None) -> str | None:
        if value:
            model_preset_name(value)
        return value


class TaacSettings(BaseSettings):
    """Every setting of the project; environment variables ``TAAC_<FIELD>`` and
    ``TAAC_<SECTION>__<FIELD>`` set them."""

    model_config = SettingsConfigDict(
        env_prefix="TAAC_",
        env_file=".env",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_root: Path = Field(Path("data"), description="Root folder of every artifact (one folder per track below it).")
    source: Literal["synthetic", "local", "hub"] = Field(
        "synthetic", description="Where the raw dataset comes from: generated, an existing copy, or the Hugging Face Hub."
    )
    local_path: Path | None = Field(None, description="The existing copy read by the `local` source (either format).")
    hub_repo_id: str | None = Field(None, description="Hub dataset repository; the track preset sets "
                                    "TAAC2025/TencentGR-1M or -10M.")
    hub_revision: str = Field("main", description="Hub revision: a commit sha pins the download; a branch is "
                              "resolved and its sha recorded.")
    hub_token: SecretStr | None = Field(None, description="Hub token, for gated or private copies; never printed. "
                                        "Run config takes only where to read it, `{env: HF_TOKEN}` or `{file: "
                                        "/run/secrets/hf_token}`, never the token (Dagster stores and shows run config).")
    hub_endpoint: str | None = Field(
        None, pattern=r"^https?://\S+$", description="Base URL of the Hub or of a mirror of it (for example "
        "`https://hf-mirror.com`); unset: huggingface_hub's own (`HF_ENDPOINT`, else huggingface.co)."
    )
    hub_timeout_seconds: float = Field(
        HUB_TIMEOUT_SECONDS, gt=0, description="Seconds one Hub request may wait to connect or for the next bytes of "
        "its answer before it fails naming the endpoint (a server that accepts and never answers)."
    )
    hub_deadline_seconds: float = Field(
        HUB_DEADLINE_SECONDS, gt=0, description="Seconds the whole Hub fetch (resolve, listing, download, retries "
        "included) may take before it stops with an error; finished files are kept and a re-run fetches the rest."
    )
    embedding_families: Annotated[list[int] | None, NoDecode] = Field(
        None, description="Multi-modal families to read; unset (`auto`): every family the dataset holds, possibly "
        "none. A list (`81`, `81,82`) reads exactly those, `none` no family. The synthetic and Hub sources fetch "
        "family 81 alone on auto."
    )
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings, description="The generated dataset.")
    semantic_ids: SemanticIdSettings = Field(default_factory=SemanticIdSettings, description="Semantic IDs.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Encoder training.")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings, description="The Faiss index.")
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings, description="Report and submission.")
    max_history: int = Field(100, ge=1, le=100, description="Events kept per user history (the latest ones).")
    check_sample_users: int = Field(
        20_000, ge=100, description="Users whose every row the quality checks validate on large tables (a "
        "deterministic sample; small tables are validated whole)."
    )
    retrain_cron: str = Field("0 3 * * 1", description="Cron (UTC) of the retraining schedule (default Monday 03:00).")
    retrain_schedule_enabled: bool = Field(False, description="Whether the retraining schedule starts switched on.")
    duckdb_memory_limit: str = Field(
        "8GB", description="Memory limit of every DuckDB connection: a size (`8GB`, `512MiB`) or a share of RAM (`50%`)."
    )
    duckdb_threads: int | None = Field(None, ge=1, description="Threads of every DuckDB connection; unset: every core.")
    track_lock_timeout: float = Field(
        3600.0, ge=0, description="Seconds a step waits for its track's lock while another run writes that track, "
        "before it stops naming the holder; 0 refuses at once."
    )
    rejected_keep: int = Field(
        3, ge=0, description="Builds that failed their checks kept for inspection per folder (`rejected/` of the "
        "warehouse and of the indexes), the newest first; older ones are removed."
    )
    run_lease_ttl: float = Field(
        600.0, gt=0, description="Seconds a run keeps its track between two of its steps (the run lease) when its "
        "end cannot be seen in this Dagster instance (a run of another instance, or one that died unrecorded)."
    )

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


def training_overrides(settings: TaacSettings) -> dict[str, Any]:
    """The model preset's ``train:`` values the settings override (``models.train_config.TrainConfig``
    fields): the one list both the in-process path (``taac_dagster.steps.training.train_track``) and the
    torchrun command (``assets.training.torchrun_command``) pass on."""
    training = settings.training
    overrides: dict[str, Any] = {
        "device": training.device,
        "val_users": training.val_users,
        # Validation ranks the way the report does.
        "exclude_history": settings.evaluation.exclude_history,
    }
    # Unset: the preset's.
    for key in ("epochs", "max_steps", "max_minutes", "checkpoint_minutes", "batch_size", "threads", "patience"):
        if getattr(training, key) is not None:
            overrides[key] = getattr(training, key)
    return overrides
