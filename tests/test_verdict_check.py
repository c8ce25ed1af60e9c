"""The demo's verdict check: what the night flagged against what the archive truly holds."""

from collections import Counter

from scores_data import build_scores_dataset
from uflow_batch.devtools.verdict_check import verdict_counts


def test_flagged_images_are_counted_apart_for_defective_and_good_parts(tmp_path):
    scores = build_scores_dataset(tmp_path / "scores")
    scored = scores.scored()
    # Call every other scored image defective: the check must count from the truth, not from the verdict.
    truth = {row["image_uri"]: ("crack" if i % 2 else "good") for i, row in enumerate(scored)}
    expected: dict[str, Counter] = {}
    for i, row in enumerate(scored):
        kind = "defective" if i % 2 else "good"
        tally = expected.setdefault(row["category"], Counter())
        tally[kind] += 1
        tally[f"{kind}_flagged"] += bool(row["is_anomalous"])
    assert verdict_counts(truth, str(scores.root)) == expected
    assert verdict_counts({}, str(scores.root)) == {}, "images the truth does not know are not counted"
