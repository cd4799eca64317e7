"""Data-quality checks of the warehouse: Great Expectations suites plus full-table SQL counts.

Great Expectations 1.x cannot validate DuckDB through its SQL datasource, so each suite runs
on a pandas frame read through a read-only DuckDB connection: every row of the sampled users
(``user_id % modulus = 0``, deterministic; re-ids are dense so this is a uniform sample) or
of the whole table when it is small. The invariants a SQL count settles cheaply are counted
over the whole table (never a sample): non-empty tables, unique users and (user, position)
pairs, plausible timestamps, finite vectors... A failed check's description names the
offending ids and, read back from the raw dataset, the file and line or row they came from.

Nothing here imports Dagster; ``assets/warehouse.py`` turns ``CheckOutcome`` into check results.

The modules: ``context`` (what a check sees and returns), ``suites`` (Great Expectations),
the checks by table (``events``, ``tables``, ``embeddings``) and ``run`` (``CHECKS``,
``run_checks``).
"""

from taac_dagster.quality.context import ERROR, WARN, CheckContext, CheckOutcome, CheckSpec
from taac_dagster.quality.run import CHECKS, run_checks

__all__ = ["CHECKS", "ERROR", "WARN", "CheckContext", "CheckOutcome", "CheckSpec", "run_checks"]
