-- Defect area of the images flagged anomalous, per category (pixels of the
-- original image; normal images have area 0 and are left out).
SELECT
    category,
    count(*)                                       AS n_anomalous,
    min(defect_area_px)                            AS min_px,
    quantile_cont(defect_area_px, 0.25)            AS p25_px,
    quantile_cont(defect_area_px, 0.50)            AS median_px,
    quantile_cont(defect_area_px, 0.75)            AS p75_px,
    quantile_cont(defect_area_px, 0.95)            AS p95_px,
    max(defect_area_px)                            AS max_px,
    avg(defect_area_fraction)                      AS mean_area_fraction,
    avg(n_regions)                                 AS mean_regions
FROM {current_rows}
WHERE error IS NULL AND is_anomalous
GROUP BY category
ORDER BY category;
