-- candidates: the retrieval pool. With a published pool (Hub candidate/ or predict_set.jsonl)
-- it is that pool plus any holdout target missing from it (in_published_pool = false), so the
-- extended row of the local evaluation can hit its target; without one, every known item is a
-- candidate. released: the pool a submission may recommend and the report's headline scores
-- against (the published pool, or every candidate when nothing was published); a target
-- outside it is a miss there. is_cold: the item never occurs in a training sequence (or is
-- unknown to the indexer).
CREATE OR REPLACE TABLE candidates AS
WITH published AS (
    SELECT creative_id, any_value(COLUMNS(* EXCLUDE (creative_id)))
    FROM stg_candidates GROUP BY creative_id
),
has_published AS (SELECT count(*) > 0 AS yes FROM published),
pool AS (
    SELECT p.creative_id, ix.item_id, p.retrieval_id, true AS in_published_pool,
           p.* EXCLUDE (creative_id, retrieval_id)
    FROM published p
    LEFT JOIN (SELECT creative_id, min(item_id) AS item_id FROM stg_item_index GROUP BY creative_id) ix
        USING (creative_id)
    UNION ALL BY NAME
    SELECT i.creative_id, i.item_id,
           (SELECT coalesce(max(retrieval_id), 0) FROM published)
               + row_number() OVER (ORDER BY i.item_id) AS retrieval_id,
           false AS in_published_pool,
           i.* EXCLUDE (item_id, creative_id), 0 AS cold_features
    FROM items i
    WHERE (NOT (SELECT yes FROM has_published)
           OR i.item_id IN (SELECT target_item_id FROM holdout))
      AND i.creative_id NOT IN (SELECT creative_id FROM published)
),
trained AS (SELECT DISTINCT unnest(item_ids) AS item_id FROM sequences)
SELECT pool.*,
       (pool.in_published_pool OR NOT (SELECT yes FROM has_published)) AS released,
       (pool.item_id IS NULL OR pool.item_id NOT IN (SELECT item_id FROM trained)) AS is_cold
FROM pool
ORDER BY retrieval_id;
