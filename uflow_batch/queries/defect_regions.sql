-- One row per connected defect region (8-connectivity), largest first.
-- Boxes are [x0, x1) x [y0, y1) in pixels of the original image; the region
-- areas of an image add up to its defect_area_px.
SELECT
    category,
    run_date,
    image_uri,
    region.x0,
    region.y0,
    region.x1,
    region.y1,
    region.area_px,
    region.peak_neg_log10_nfa
FROM (
    SELECT category, run_date, image_uri, unnest(regions) AS region
    FROM {current_rows}
    WHERE error IS NULL
)
ORDER BY region.area_px DESC, image_uri, region.y0, region.x0;
