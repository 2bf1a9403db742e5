"""The numbers of a study: summary statistics of per-subject values (`describe`) and the paired
two-sided Wilcoxon signed-rank test of two arms (`paired_wilcoxon`). Pure functions of values;
the package docstring says which values are pooled and paired."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

LOWER_IS_BETTER = frozenset({"hd95_mm"})  # distances: a lower value is the better one


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, population std and median (None when empty)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None}
    return {"n": int(array.size), "mean": float(array.mean()), "std": float(array.std()),
            "median": float(np.median(array))}


def paired_wilcoxon(a: Mapping[Any, float], b: Mapping[Any, float],
                    min_pairs: int = 5, lower_is_better: bool = False) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of a vs b on their common keys.

    Args:
      a, b: pairing key (repeat, subject) -> value.
      min_pairs: fewer common keys -> "n/a".
      lower_is_better: the metric is a distance (HD95): "better" counts lower values.

    Returns:
      {"n_pairs", "n_nonzero", "mean_difference", "median_difference" (a − b), "a_better",
       "b_better" (counts of pairs where that side is better: higher Dice, or lower values
       with lower_is_better), "statistic", "p_value", "note"}; p_value and statistic are None
       with a reason in "note" for degenerate cases.
    """
    from scipy import stats

    keys = sorted(set(a) & set(b))
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    d = x - y
    result = {"n_pairs": len(keys), "n_nonzero": int(np.count_nonzero(d)),
              "mean_difference": float(d.mean()) if keys else None,
              "median_difference": float(np.median(d)) if keys else None,
              "a_better": int((d < 0).sum() if lower_is_better else (d > 0).sum()),
              "b_better": int((d > 0).sum() if lower_is_better else (d < 0).sum()),
              "statistic": None, "p_value": None, "note": ""}
    if len(keys) < min_pairs:
        result["note"] = f"n/a: {len(keys)} pairs, fewer than the {min_pairs} required"
    elif not np.any(d):
        result["note"] = "n/a: all differences are zero"
    else:
        test = stats.wilcoxon(x, y)
        result["statistic"], result["p_value"] = float(test.statistic), float(test.pvalue)
    return result
