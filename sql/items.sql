-- items: every item that has features or appears in an event; re-id, raw creative id and the
-- sparse features (f100 ... f122, NULL when the item lacks one).
CREATE OR REPLACE TABLE items AS
WITH ids AS (
    SELECT item_id FROM stg_item_features
    UNION
    SELECT DISTINCT item_id FROM stg_events
),
features AS (
    SELECT item_id, any_value(COLUMNS(* EXCLUDE (item_id)))
    FROM stg_item_features GROUP BY item_id
),
raw_ids AS (
    SELECT item_id, min(creative_id) AS creative_id FROM stg_item_index GROUP BY item_id
)
SELECT ids.item_id, r.creative_id, f.* EXCLUDE (item_id)
FROM ids LEFT JOIN features f USING (item_id) LEFT JOIN raw_ids r USING (item_id)
ORDER BY ids.item_id;
