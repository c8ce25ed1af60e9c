-- {current_rows}: the current row of each image and night, which every shipped query reads.
-- A night may hold several rows of one image (part files are an append-only log): the
-- no_model rows of a run against the wrong model store and the scores of the corrected
-- re-run, or the scores of two model versions. The current row is a scored one if there is
-- any, else an error; the latest of those (scored_at), the highest model version on a tie.
(
    SELECT *
    FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true,
                      hive_types = {'category': VARCHAR, 'run_date': DATE}, union_by_name = true)
    QUALIFY row_number() OVER (
        PARTITION BY run_date, image_uri
        ORDER BY error IS NULL DESC, scored_at DESC NULLS LAST, model_version DESC NULLS LAST
    ) = 1
)
