"""Fetch the TencentGR release from the Hugging Face Hub (the Parquet release, format A of docs/domain.md).

Only the files the run needs are fetched: the ~2 GB core (sequences, features, candidates,
indexer) plus the embedding families asked for, not the 137 GB of all six families. With the
families on auto (``TAAC_EMBEDDING_FAMILIES`` unset) that is family 81 alone
(``formats.DEFAULT_FETCH_FAMILIES``); the warehouse then reads every family the copy holds.

Downloads go straight into ``local_dir`` through ``huggingface_hub.snapshot_download``, which
draws its own tqdm bars. Re-running after an interruption keeps every finished file (checked
against ``local_dir/.cache/huggingface/download/*.metadata``) and fetches only the rest. A
file cut off mid-way is resumed with an HTTP Range request while the process lives. Across
runs it depends on the huggingface_hub version: older releases reuse
``<hash>.<etag>.incomplete`` and resume it; 2.x writes process-unique temp files
(huggingface_hub PR #4228) and restarts that one file. After each download the
folder is verified and a manifest (``MANIFEST_NAME``) records the repo, the resolved commit
and the expected files, so a later run can verify and use a complete copy without the network.

Every file stored in Git LFS (the parquet parts and ``indexer.pkl``) is verified by the sha256
the Hub lists for it, not only by its size: a same-size corrupt or stale file is removed and
fetched again. Hashes already checked are remembered (``VERIFIED_NAME``: size, mtime, ctime
and digest per file), so a re-run rehashes only files written since, not the whole release.

Every Hub request waits at most ``timeout`` seconds to connect or for the next bytes of its answer,
and the whole fetch stops at ``deadline`` seconds (``hub_timeout_seconds``, ``hub_deadline_seconds``):
the caller holds the track's lock meanwhile, and huggingface_hub sets no timeout on some calls.

The modules: ``release`` (files and patterns), ``verify``, ``local_copy`` (the manifest and the
offline fallback), ``errors``, ``limits`` (timeout and deadline) and ``download``.
"""

from taac_dagster.sources.hub.download import download_hub_dataset
from taac_dagster.sources.hub.limits import HubDeadlineExceeded
from taac_dagster.sources.hub.local_copy import MANIFEST_NAME
from taac_dagster.sources.hub.release import HubDownload, LogLike, hub_allow_patterns
from taac_dagster.sources.hub.verify import file_sha256, verify_download

__all__ = [
    "MANIFEST_NAME",
    "HubDeadlineExceeded",
    "HubDownload",
    "LogLike",
    "download_hub_dataset",
    "file_sha256",
    "hub_allow_patterns",
    "verify_download",
]
