-- Defect rate per category and night.
-- defect_rate = anomalous / scored, where "scored" means error IS NULL: errored
-- images are counted apart (n_errors) and never as defect-free.
-- n_images counts each image once per night, by its current row (_current_rows.sql).
-- {root} is the dataset root: a local directory or an s3:// prefix.
SELECT
    category,
    run_date,
    count(*)                                                 AS n_images,
    count(*) FILTER (WHERE error IS NULL)                    AS n_scored,
    count(*) FILTER (WHERE error IS NULL AND is_anomalous)   AS n_anomalous,
    count(*) FILTER (WHERE error IS NOT NULL)                AS n_errors,
    count(*) FILTER (WHERE error IS NULL AND is_anomalous)
        / nullif(count(*) FILTER (WHERE error IS NULL), 0)   AS defect_rate
FROM {current_rows}
GROUP BY category, run_date
ORDER BY category, run_date;
