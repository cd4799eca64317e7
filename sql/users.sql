-- users: every user with a profile or an event; re-id, raw id, sparse features (f103, f104,
-- f105, f109) and multi-valued features (f106, f107, f108, f110 as lists).
CREATE OR REPLACE TABLE users AS
WITH ids AS (
    SELECT user_id FROM stg_user_features
    UNION
    SELECT DISTINCT user_id FROM stg_events
),
features AS (
    SELECT * FROM stg_user_features
    QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY user_id) = 1
),
raw_ids AS (
    SELECT user_id, min(raw_user_id) AS raw_user_id FROM stg_user_index GROUP BY user_id
)
SELECT ids.user_id, r.raw_user_id, f.* EXCLUDE (user_id)
FROM ids LEFT JOIN features f USING (user_id) LEFT JOIN raw_ids r USING (user_id)
ORDER BY ids.user_id;
