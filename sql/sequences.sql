-- sequences: the training history per user as aligned lists, at most {max_history} events,
-- the most recent ones. For a holdout user only events strictly before the target count.
CREATE OR REPLACE TABLE sequences AS
WITH bounds AS (
    SELECT e.user_id, coalesce(any_value(h.target_position), max(e.position) + 1) AS end_position
    FROM events e LEFT JOIN holdout h USING (user_id)
    GROUP BY e.user_id
)
SELECT e.user_id,
       list(e.item_id ORDER BY e.position) AS item_ids,
       list(e.action_type ORDER BY e.position) AS action_types,
       list(e."timestamp" ORDER BY e.position) AS timestamps,
       count(*)::INTEGER AS length,
       min(e.position) AS first_position,
       max(e.position) AS last_position
FROM events e JOIN bounds b USING (user_id)
WHERE e.position < b.end_position AND e.position >= b.end_position - {max_history}
GROUP BY e.user_id
ORDER BY e.user_id;
