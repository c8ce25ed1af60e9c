-- How many images failed, per category, night and error code.
SELECT
    category,
    run_date,
    error,
    count(*) AS n_images
FROM {current_rows}
WHERE error IS NOT NULL
GROUP BY category, run_date, error
ORDER BY category, run_date, error;
