-- feature_vocab: vocabulary size of every feature in indexer.pkl. Re-ids run 1..vocab_size
-- (0 = padding); the quality checks hold feature values to this range.
CREATE OR REPLACE TABLE feature_vocab AS
SELECT feature_id, max(vocab_size) AS vocab_size FROM stg_feature_vocab GROUP BY feature_id
ORDER BY feature_id;
