-- events: one row per interaction; position is the 0-based index in the user's source order.
-- Policy for records whose action_type is NULL (about 1.3% of real 1M records): they are kept
-- in the history as exposures (action_type 0) with action_type_missing = true, so they never
-- become a target. The quality check events_missing_action_types reports their count (WARN).
-- An action type outside INTEGER becomes NULL here and is then named, with its file and row,
-- by the build's domain check (taac_dagster.warehouse.validate_events).
CREATE OR REPLACE TABLE events AS
SELECT
    user_id,
    position,
    item_id,
    TRY_CAST(coalesce(action_type, 0) AS INTEGER) AS action_type,
    action_type IS NULL AS action_type_missing,
    "timestamp"
FROM stg_events;
