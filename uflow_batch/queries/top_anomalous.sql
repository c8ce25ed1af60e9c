-- The 50 most anomalous scored images, all categories and nights together.
-- Ties are broken by the peak -log10 NFA, then by URI, so the list is stable.
-- mask_png is left out on purpose: it is the heaviest column by far.
SELECT
    category,
    run_date,
    image_uri,
    image_score,
    max_neg_log10_nfa,
    defect_area_px,
    defect_area_fraction,
    n_regions,
    model_version
FROM {current_rows}
WHERE error IS NULL
ORDER BY image_score DESC, max_neg_log10_nfa DESC, image_uri
LIMIT 50;
