"""Materialize the raw dataset of one track from the configured source, and describe it.

- ``synthetic``: generate a dataset in the real formats under ``<root>/<track>/raw/synthetic``
  (atomic).
- ``local``: use an existing copy in place (either real format, detected), nothing copied.
- ``hub``: download the release into ``<root>/<track>/raw/hub`` (resumable), then publish it
  complete as ``raw/hub-published`` (hard links to the downloaded files, one folder switch):
  the warehouse reads the published copy, so a later download that fails or is killed half-way
  never changes the files a manifest describes.

The two sources that write keep separate folders: generating a synthetic dataset never
replaces a (137 GB) download, and a download never mixes with generated files.

Whatever the source, the result is a ``RawManifest`` written to ``raw_manifest.json``: the
folder the warehouse reads, its format, and a content fingerprint that is the asset's
DataVersion, so a changed input marks everything downstream stale.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taac_dagster.atomic import atomic_dir, remove_stale_temps, write_text_atomic
from taac_dagster.errors import RawDataChangedError, SourceUnavailableError
from taac_dagster.fingerprint import fingerprint_tree, visible_files
from taac_dagster.formats import DEFAULT_FETCH_FAMILIES, HUB_FORMAT, hub_embedding_dirs, jsonl_embedding_sources
from taac_dagster.paths import TrackPaths
from taac_dagster.readers.detect import detect_format
from taac_dagster.readers.embeddings import select_embedding_families
from taac_dagster.settings import TaacSettings

log = logging.getLogger(__name__)


@dataclass
class RawManifest:
    track: str
    source: str
    dataset_format: str
    root: str
    digest: str
    files: int
    total_bytes: int
    sampled_files: int
    families: list[int]  # the embedding families selected (read by the warehouse)
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    families_requested: list[int] | None = None  # the setting; None: auto (every family found)
    # [relative path, size, mtime in ns] of every file the fingerprint covers, to re-check cheaply
    # that the files are still the ones fingerprinted (empty in manifests from before it).
    file_stats: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> RawManifest:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: materialize raw_dataset for this track first")
        return cls(**json.loads(path.read_text()))


def dataset_files(root: Path, dataset_format: str, families: list[int]) -> list[Path]:
    """The files the warehouse reads: what the fingerprint covers (unused families excluded)."""
    if dataset_format == HUB_FORMAT:
        names = ["seq", "user_feat", "item_feat", "candidate"]
        files = [p for name in names if (root / name).is_dir() for p in sorted((root / name).glob("*.parquet"))]
        emb = hub_embedding_dirs(root)
    else:
        files = [root / n for n in ("seq.jsonl", "predict_set.jsonl", "item_feat_dict.json") if (root / n).is_file()]
        emb = jsonl_embedding_sources(root)
    files.append(root / "indexer.pkl")
    for family in families:
        if family in emb:
            path = emb[family][1]
            files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    return files


def file_stats(root: Path, files: list[Path]) -> list[list[Any]]:
    """[path relative to ``root``, size, mtime in ns] per file, sorted; a missing file has size -1."""
    stats = []
    for path in files:
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except FileNotFoundError:
            size, mtime = -1, 0
        stats.append([path.relative_to(root).as_posix(), size, mtime])
    return sorted(stats)


def verify_raw_files(manifest: RawManifest, manifest_path: Path) -> None:
    """Raise ``RawDataChangedError`` unless the raw files are the ones ``manifest`` recorded:
    the same files with the same sizes and modification times (the full fingerprint again for
    a manifest from before those were recorded)."""
    root = Path(manifest.root)
    if not root.is_dir():
        raise RawDataChangedError(manifest_path, [f"{root} is missing"])
    files = dataset_files(root, manifest.dataset_format, manifest.families)
    if not manifest.file_stats:
        digest = fingerprint_tree(root, [f for f in files if f.exists()]).digest
        if digest != manifest.digest:
            raise RawDataChangedError(manifest_path, [f"fingerprint {digest[:12]}, recorded {manifest.digest[:12]}"])
        return
    recorded = {path: (size, mtime) for path, size, mtime in manifest.file_stats}
    now = {path: (size, mtime) for path, size, mtime in file_stats(root, files)}
    changes = []
    for path in sorted(set(recorded) | set(now)):
        before, after = recorded.get(path), now.get(path)
        if before == after:
            continue
        if before is None:
            changes.append(f"{root / path}: new file")
        elif after is None or after[0] < 0:
            changes.append(f"{root / path}: missing")
        else:
            changes.append(
                f"{root / path}: {after[0]:,} bytes modified at {after[1]} ns, recorded {before[0]:,} bytes at {before[1]} ns"
            )
    if changes:
        raise RawDataChangedError(manifest_path, changes)


def _adopt_legacy_hub_download(paths: TrackPaths, logger: logging.Logger) -> None:
    """Earlier versions downloaded the Hub release straight into ``raw/``: move such a copy
    to ``raw/hub/`` (two renames) rather than fetch it again."""
    from taac_dagster.sources.hub import MANIFEST_NAME

    aside = paths.root / ".raw-hub-adopt"  # the copy between the two renames
    if paths.raw_for("hub").exists():
        return
    if not aside.exists():
        if not (paths.raw / MANIFEST_NAME).is_file():
            return
        os.replace(paths.raw, aside)
    paths.raw.mkdir(exist_ok=True)
    os.replace(aside, paths.raw_for("hub"))
    logger.info(f"moved the Hub download found in {paths.raw} to {paths.raw_for('hub')}")


# Hard links cannot be made here (another file system, a file system without them): the
# download is then read in place and only the raw verification guards the warehouse.
_NO_LINKS = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def _same_files(download: Path, published: Path, files: list[Path]) -> bool:
    """Whether ``published`` holds exactly ``files``, each the very file (inode) of the download."""
    if not published.is_dir() or visible_files(published) != files:
        return False
    for relative in files:
        first, second = (download / relative).stat(), (published / relative).stat()
        if (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino):
            return False
    return True


def publish_download(download: Path, published: Path, logger: logging.Logger | None = None) -> Path:
    """Publish the verified download as a complete copy the warehouse reads: a folder of hard
    links to its files, switched into ``published`` at once (``atomic_dir``). A later download
    replaces files in ``download`` by renaming new ones over them (huggingface_hub never writes
    into a finished file), so the published links keep the bytes this manifest describes until
    the next publish. No data is copied. Returns the folder to read: ``published``, or
    ``download`` itself where hard links are not possible (with a warning)."""
    logger = logger or log
    files = visible_files(download)
    if _same_files(download, published, files):
        return published
    try:
        with atomic_dir(published) as staging:
            for relative in files:
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                os.link(download / relative, staging / relative)
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise
        logger.warning(
            f"cannot hard-link the download in {download} ({error.strerror}): the warehouse reads it in "
            "place, so a later download that fails half-way leaves files the raw manifest does not "
            "describe (the warehouse then refuses them until raw_dataset is run again)"
        )
        return download
    logger.info(f"published the download: {len(files)} files linked into {published}")
    return published


def materialize_raw(settings: TaacSettings, paths: TrackPaths, *, logger: logging.Logger | None = None) -> RawManifest:
    logger = logger or log
    started = time.perf_counter()
    requested = settings.embedding_families
    fetch = list(DEFAULT_FETCH_FAMILIES) if requested is None else list(requested)
    paths.root.mkdir(parents=True, exist_ok=True)
    if remove_stale_temps(paths.root) + remove_stale_temps(paths.raw):
        logger.warning(f"removed leftovers of an interrupted run in {paths.root}")
    root, details = _source_root(settings, paths, fetch, logger)

    dataset_format = detect_format(root)
    families = select_embedding_families(root, dataset_format, requested)
    logger.info(
        f"embedding families {families or 'none'} "
        + ("(auto: every family found)" if requested is None else f"(requested {requested})")
    )
    print_progress = settings.source != "synthetic"
    files = dataset_files(root, dataset_format, families)
    stats = file_stats(root, files)
    fingerprint = fingerprint_tree(root, files, progress=print_progress)
    if file_stats(root, files) != stats:
        raise RawDataChangedError(paths.raw_manifest, ["the files changed while they were fingerprinted"])
    manifest = RawManifest(
        track=paths.track,
        source=settings.source,
        dataset_format=dataset_format,
        root=str(root),
        digest=fingerprint.digest,
        files=len(fingerprint.files),
        total_bytes=fingerprint.total_bytes,
        sampled_files=fingerprint.sampled_files,
        families=families,
        seconds=round(time.perf_counter() - started, 2),
        details=details,
        families_requested=None if requested is None else list(requested),
        file_stats=stats,
    )
    write_text_atomic(paths.raw_manifest, manifest.to_json())
    return manifest


def _source_root(
    settings: TaacSettings, paths: TrackPaths, fetch: list[int], logger: logging.Logger
) -> tuple[Path, dict[str, Any]]:
    """The folder holding the configured source's dataset, made ready (generated, downloaded and
    published), and what the manifest records about how it got there."""
    if settings.source == "synthetic":
        return _generate_synthetic(settings, paths, fetch, logger)
    if settings.source == "local":
        if settings.local_path is None:
            raise SourceUnavailableError("source is 'local' but no local path is set: set TAAC_LOCAL_PATH")
        return Path(settings.local_path).expanduser().resolve(), {}
    if settings.source == "hub":
        return _download_hub(settings, paths, fetch, logger)
    # pydantic already restricts the values; kept for readers of this function
    raise ValueError(f"unknown source {settings.source!r}")


def _generate_synthetic(
    settings: TaacSettings, paths: TrackPaths, fetch: list[int], logger: logging.Logger
) -> tuple[Path, dict[str, Any]]:
    from taac_dagster.sources.synthetic import generate_dataset

    root = paths.raw_for("synthetic")
    with atomic_dir(root) as tmp:
        summary = generate_dataset(tmp, paths.track, settings.synthetic, fetch)
    details = {"synthetic": settings.synthetic.model_dump(), "generated": summary.to_metadata()}
    logger.info(f"generated a synthetic {paths.track} dataset: {summary.events} events, {summary.users} users")
    return root, details


def _download_hub(
    settings: TaacSettings, paths: TrackPaths, fetch: list[int], logger: logging.Logger
) -> tuple[Path, dict[str, Any]]:
    from taac_dagster.sources.hub import download_hub_dataset

    if not settings.hub_repo_id:
        raise SourceUnavailableError("source is 'hub' but no repository is set: set TAAC_HUB_REPO_ID")
    root = paths.raw_for("hub")
    _adopt_legacy_hub_download(paths, logger)
    download = download_hub_dataset(
        settings.hub_repo_id,
        settings.hub_revision,
        root,
        fetch,
        token=settings.hub_token.get_secret_value() if settings.hub_token else None,
        log=logger,
        endpoint=settings.hub_endpoint,
        timeout=settings.hub_timeout_seconds,
        deadline=settings.hub_deadline_seconds,
    )
    details = {
        "repo_id": download.repo_id,
        "revision": download.revision,
        "commit_sha": download.commit_sha or "unknown",
        "used_local_copy": download.used_local_copy,
    }
    return publish_download(root, paths.raw_published("hub"), logger), details
