-- How many images failed, per category, night and error code.
SELECT
    category,
    run_date,
    error,
    count(*) AS n_images
FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true,
                  hive_types = {'category': VARCHAR, 'run_date': DATE}, union_by_name = true)
WHERE error IS NOT NULL
GROUP BY category, run_date, error
ORDER BY category, run_date, error;
