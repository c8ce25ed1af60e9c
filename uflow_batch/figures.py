"""Static figures of evaluation results (PNG), for READMEs and reviews."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
from matplotlib import pyplot as plt  # noqa: E402


def calibration_figure(reports: Sequence[dict], out: str | Path) -> Path:
    """False detections per good test image against the promised epsilon, one line per category.

    The a-contrario promise holds where a line stays on or under the diagonal.
    """
    figure, axes = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    epsilons = sorted({e for r in reports for e in r["calibration_curve"]["epsilon"]})
    axes.plot(epsilons, epsilons, color="grey", linestyle="--", label="promise: at most epsilon")
    for report in reports:
        curve = report["calibration_curve"]
        # Zero counts cannot be drawn on a log axis: show them at the bottom edge.
        floor = min(epsilons) / 10
        observed = [max(d, floor) for d in curve["detections_per_good_image"]]
        axes.plot(curve["epsilon"], observed, marker="o", label=f"{report['category']} ({report['nfa_test']} test)")
    axes.set(xscale="log", yscale="log", xlabel="epsilon (promised false detections per image)",
             ylabel="observed false detections per good test image", title="NFA calibration on test/good")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return Path(out)
