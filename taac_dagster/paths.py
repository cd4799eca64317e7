"""Where each track's artifacts live under the data root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from taac_dagster.tracks import get_track


@dataclass(frozen=True)
class TrackPaths:
    data_root: Path
    track: str

    def __post_init__(self) -> None:
        get_track(self.track)
        object.__setattr__(self, "data_root", Path(self.data_root).resolve())

    @property
    def root(self) -> Path:
        return self.data_root / self.track

    @property
    def raw(self) -> Path:
        """The folder of the raw datasets this track generated or downloaded, one per source."""
        return self.root / "raw"

    def raw_for(self, source: str) -> Path:
        """Where ``source`` (synthetic or hub) keeps its copy: ``raw/<source>/``. Each source has
        its own folder, so switching sources never deletes (or reads) the other's files."""
        return self.raw / source

    def raw_published(self, source: str) -> Path:
        """The complete copy of a download that the warehouse reads (``raw/<source>-published/``):
        hard links to the files of ``raw_for(source)``, switched in at once after each verified
        download (``taac_dagster.raw.publish_download``)."""
        return self.raw / f"{source}-published"

    @property
    def raw_manifest(self) -> Path:
        return self.root / "raw_manifest.json"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def codebooks(self) -> Path:
        return self.root / "codebooks"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def vectors(self) -> Path:
        """The encoded user vectors, one folder per preset (models/user_vectors.py)."""
        return self.root / "vectors"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
