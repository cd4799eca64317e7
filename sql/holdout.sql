-- holdout: per user the retrieval target and the history strictly before it.
-- The target is the user's last event of the first action type of {target_actions} present
-- (1M: last click; 10M: last conversion, else last click). target_items lists every positive
-- event from the target on (distinct items, highest action kept): the weighted 10M metrics
-- score against all of them. Events at or after the target never reach training.
CREATE OR REPLACE TABLE holdout AS
WITH cut AS (
    SELECT user_id, {target_position} AS target_position
    FROM events
    WHERE NOT action_type_missing
    GROUP BY user_id
    HAVING {target_position} IS NOT NULL
),
target AS (
    SELECT c.user_id, c.target_position, e.item_id AS target_item_id,
           e.action_type AS target_action_type, e."timestamp" AS target_timestamp
    FROM cut c JOIN events e ON e.user_id = c.user_id AND e.position = c.target_position
),
history AS (
    SELECT c.user_id,
           list(e.item_id ORDER BY e.position) AS history_item_ids,
           list(e.action_type ORDER BY e.position) AS history_action_types,
           list(e."timestamp" ORDER BY e.position) AS history_timestamps
    FROM cut c JOIN events e ON e.user_id = c.user_id
    WHERE e.position < c.target_position AND e.position >= c.target_position - {max_history}
    GROUP BY c.user_id
),
positives AS (
    SELECT user_id, list(item_id ORDER BY first_position) AS target_item_ids,
           list(action_type ORDER BY first_position) AS target_action_types
    FROM (
        SELECT c.user_id, e.item_id, max(e.action_type) AS action_type, min(e.position) AS first_position
        FROM cut c JOIN events e ON e.user_id = c.user_id
        WHERE e.position >= c.target_position AND e.action_type IN {target_actions}
              AND NOT e.action_type_missing
        GROUP BY c.user_id, e.item_id
    )
    GROUP BY user_id
)
SELECT t.user_id, t.target_item_id, t.target_action_type, t.target_timestamp, t.target_position,
       coalesce(h.history_item_ids, []::BIGINT[]) AS history_item_ids,
       coalesce(h.history_action_types, []::INTEGER[]) AS history_action_types,
       coalesce(h.history_timestamps, []::BIGINT[]) AS history_timestamps,
       p.target_item_ids, p.target_action_types
FROM target t LEFT JOIN history h USING (user_id) JOIN positives p USING (user_id)
ORDER BY t.user_id;
