"""The official submission file: ``{"top10s": [[10 raw creative ids] ...], "user": [raw user ids]}``.

Rules checked before anything is written (``SubmissionError`` names the first offender and
how many there are): as many lists as users; no user twice; every list exactly 10 ids; the 10
ids distinct; every id a creative id of the candidate pool. Nothing is written before the rules
pass, and the file goes through ``publish`` (models/publish.py: the pipeline's step writes it
beside its target and renames it into place), so a failed validation or a crash leaves the
previous submission untouched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelError
from models.metrics import K
from models.publish import FileWriter, write_in_place


class SubmissionError(ModelError, ValueError):
    """A submission that breaks the official format's rules."""


def _as_matrix(top10s: Any, k: int) -> np.ndarray:
    if isinstance(top10s, np.ndarray):
        if top10s.ndim != 2 or top10s.shape[1] != k:
            raise SubmissionError(f"top10s must be a [users, {k}] array, got shape {top10s.shape}")
        matrix = top10s
    else:
        lists = list(top10s)
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        wrong = np.flatnonzero(lengths != k)
        if len(wrong):
            i = int(wrong[0])
            raise SubmissionError(
                f"every list must hold exactly {k} ids: {len(wrong)} lists do not, the first is "
                f"list {i} with {lengths[i]} ids"
            )
        matrix = np.asarray(lists) if lists else np.zeros((0, k), dtype=np.int64)
    if matrix.size and not np.issubdtype(matrix.dtype, np.integer):
        raise SubmissionError(f"creative ids must be integers, got {matrix.dtype}")
    return matrix.astype(np.int64, copy=False)


def validate_submission(
    top10s: Any,
    users: Sequence[Any] | np.ndarray,
    pool_creative_ids: np.ndarray,
    *,
    k: int = K,
    expected_users: Sequence[Any] | np.ndarray | None = None,
) -> np.ndarray:
    """Check the rules; return the lists as an int64 [users, k] array.

    ``expected_users``: when given, the submission must cover exactly these users.
    """
    matrix = _as_matrix(top10s, k)
    users = np.asarray(users, dtype=object)
    if users.ndim != 1:
        raise SubmissionError(f"user must be a flat list of raw user ids, got shape {users.shape}")
    if len(users) != len(matrix):
        raise SubmissionError(f"{len(matrix)} top-{k} lists for {len(users)} users: one list per user")
    if not len(users):
        raise SubmissionError("the submission is empty: no users")
    if any(u is None for u in users):
        raise SubmissionError("user ids must not be null")
    names = np.sort(users.astype(str))  # sort-based: numpy 2.4's np.unique is slow on big arrays
    repeated_users = names[1:][names[1:] == names[:-1]]
    if len(repeated_users):
        dupes = sorted(set(repeated_users.tolist()))
        raise SubmissionError(f"{len(dupes)} users appear more than once, e.g. {dupes[0]!r}")
    if expected_users is not None:
        want = set(np.asarray(expected_users, dtype=object).astype(str).tolist())
        have = set(names.tolist())
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise SubmissionError(
                f"the submission must cover the expected {len(want)} users: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
            )
    ordered = np.sort(matrix, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if repeated.any():
        i = int(np.flatnonzero(repeated)[0])
        raise SubmissionError(
            f"the {k} ids of a list must be distinct: {int(repeated.sum())} lists repeat an id, the first "
            f"is user {users[i]!r}: {matrix[i].tolist()}"
        )
    pool = np.sort(np.asarray(pool_creative_ids, dtype=np.int64))
    if not len(pool):
        raise SubmissionError("the candidate pool is empty: nothing can be submitted")
    pos = np.minimum(np.searchsorted(pool, matrix), len(pool) - 1)
    outside = pool[pos] != matrix
    if outside.any():
        i, j = (int(v) for v in np.argwhere(outside)[0])
        raise SubmissionError(
            f"every id must be a creative id of the candidate pool: {int(outside.sum())} ids are not "
            f"(in {int(outside.any(axis=1).sum())} lists), the first is {matrix[i, j]} for user {users[i]!r}"
        )
    return matrix


def build_submission(
    top10s: Any,
    users: Sequence[Any] | np.ndarray,
    pool_creative_ids: np.ndarray,
    *,
    k: int = K,
    expected_users: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, list]:
    """Validate and return ``{"top10s": [[...]], "user": [...]}`` with plain Python values."""
    matrix = validate_submission(top10s, users, pool_creative_ids, k=k, expected_users=expected_users)
    user_list = np.asarray(users, dtype=object)
    return {"top10s": matrix.tolist(), "user": [u.item() if hasattr(u, "item") else u for u in user_list]}


def write_submission(
    path: str | Path,
    top10s: Any,
    users: Sequence[Any] | np.ndarray,
    pool_creative_ids: np.ndarray,
    *,
    k: int = K,
    expected_users: Sequence[Any] | np.ndarray | None = None,
    publish: FileWriter = write_in_place,
) -> dict[str, Any]:
    """Validate, then write the JSON file through ``publish``. Returns a summary (path, users, bytes)."""
    submission = build_submission(top10s, users, pool_creative_ids, k=k, expected_users=expected_users)
    path = Path(path)

    def dump(target: Path) -> None:
        with open(target, "w") as handle:
            json.dump(submission, handle, separators=(",", ":"))

    publish(path, dump)
    return {"path": str(path), "users": len(submission["user"]), "bytes": path.stat().st_size}


def read_submission(path: str | Path) -> dict[str, list]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or set(data) != {"top10s", "user"}:
        raise SubmissionError(f"{path}: expected a JSON object with keys 'top10s' and 'user'")
    return data


__all__ = ["K", "SubmissionError", "build_submission", "read_submission", "validate_submission", "write_submission"]
