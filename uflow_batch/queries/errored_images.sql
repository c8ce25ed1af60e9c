-- Every image that could not be scored, newest night first, with the reason.
-- error is one of read_error, decode_error, no_model, inference_error
-- (docs/schema.md); error_message says the specifics.
SELECT
    category,
    run_date,
    image_uri,
    error,
    error_message,
    scored_at
FROM {current_rows}
WHERE error IS NOT NULL
ORDER BY run_date DESC, category, error, image_uri;
