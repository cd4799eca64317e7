"""The check of the embedding files: every family's dimension and finite values."""

from __future__ import annotations

from taac_dagster.quality.context import ERROR, NAMED, CheckContext, CheckOutcome, named
from taac_dagster.quality.suites import load_gx, validate_frame
from taac_dagster.readers.embeddings import find_embedding_source
from taac_dagster.sql import read_path


def check_embeddings(ctx: CheckContext) -> CheckOutcome:
    E = load_gx().expectations
    suites, counts, problems = {}, {}, []
    for family, dim, path in ctx.embedding_files:
        frame = ctx.frame(
            """SELECT creative_id, item_id, len(emb) AS dim,
                      NOT isfinite(coalesce(list_sum(emb), 'nan'::DOUBLE)) OR list_count(emb) <> len(emb) AS non_finite
               FROM read_parquet(?) WHERE hash(creative_id) % ? = 0""",
            [read_path(path), ctx.modulus],
        )
        suites[str(family)] = validate_frame(
            f"embeddings_{family}",
            frame,
            [
                E.ExpectColumnValuesToNotBeNull(column="creative_id"),
                E.ExpectColumnValuesToBeUnique(column="creative_id"),
                E.ExpectColumnValuesToBeInSet(column="dim", value_set=[dim]),
                E.ExpectColumnValuesToBeInSet(column="non_finite", value_set=[False]),
            ],
        )
        counts[f"family_{family}_wrong_dim"] = ctx.count(
            "SELECT count(*) FROM read_parquet(?) WHERE len(emb) <> ?", [read_path(path), dim]
        )
        # The sum of a vector is finite exactly when every element is (float32 values summed in
        # double cannot overflow), so one aggregate over the whole file finds NaN and infinities.
        non_finite = ctx.rows(
            """SELECT creative_id FROM read_parquet(?)
               WHERE NOT isfinite(coalesce(list_sum(emb), 'nan'::DOUBLE)) OR list_count(emb) <> len(emb)
               ORDER BY creative_id""",
            [read_path(path)],
        )
        counts[f"family_{family}_non_finite"] = len(non_finite)
        if non_finite:
            ids = [int(r[0]) for r in non_finite[:NAMED]]
            problems.append(
                f"family {family}: {len(non_finite)} vector(s) hold NaN, an infinity or a null: creative ids "
                f"{named(ids, len(non_finite))}, from {_embedding_source(ctx, family)}"
            )
        if counts[f"family_{family}_wrong_dim"]:
            problems.append(f"family {family}: {counts[f'family_{family}_wrong_dim']} vector(s) not of dimension {dim} in {path}")
    success = all(s["success"] for s in suites.values())
    passed = success and all(c == 0 for c in counts.values())
    if not passed and not problems:
        problems.append("expectations failed on the sample")
    return CheckOutcome(
        "embeddings_valid", "item_embeddings", passed, ERROR,
        "every chosen family present, each vector of the family's dimension and finite (every vector counted)",
        {"ge": suites, "full_table_violations": counts},
        problems if not passed else [],
    )


def _embedding_source(ctx: CheckContext, family: int) -> str:
    """The raw files a family's vectors were read from."""
    if ctx.source_root is None or ctx.dataset_format is None:
        return "the raw dataset"
    try:
        return str(find_embedding_source(ctx.source_root, ctx.dataset_format, family).path)
    except Exception:  # the source moved since the build: name the folder it was in
        return str(ctx.source_root)
