"""Several seeds: a model's runs summed up as their mean and spread, and the verdict per metric.

A model's entry in compare.json holds the fields of one run, each the mean over the runs (a loss
curve step by step; what every run shares, such as its config, as it is), "runs" (every run's own
entry) and "spread" ({metric: standard deviation over the runs}, None with a single run).
"""
import statistics

METRICS = {  # metric: what the verdicts call it
    "pretraining.mlm_accuracy": "MLM accuracy",
    "pretraining.pair_accuracy": "NSP / SOP accuracy",
    "classification.accuracy": "classification accuracy",
    "qa.exact_match": "QA exact match",
    "qa.f1": "QA F1",
    "pretraining.tokens_per_s": "pretraining tokens/s",
}


def value(entry, metric):
    """A metric (a dotted path such as "qa.f1") of a model's entry."""
    for key in metric.split("."):
        entry = entry[key]
    return entry


def mean_of(values):
    """The element-wise mean of equally shaped JSON values; what they all share (and what is not a
    number) as the first has it."""
    first = values[0]
    if isinstance(first, dict):
        return {key: mean_of([v[key] for v in values]) for key in first}
    if isinstance(first, list):
        return [mean_of(list(column)) for column in zip(*values)]
    if isinstance(first, bool) or not isinstance(first, (int, float)) or all(v == first for v in values):
        return first
    mean = statistics.fmean(values)
    return round(mean) if isinstance(first, int) else mean


def summary(runs):
    """A model's entry from its runs (see the module docstring)."""
    entry = mean_of(runs)
    entry["runs"] = runs
    entry["spread"] = {metric: statistics.stdev(value(run, metric) for run in runs) if len(runs) > 1 else None
                       for metric in METRICS}
    return entry


def verdict(metric, models, names):
    """One line: which model scores higher on `metric`, and whether the difference exceeds the spread
    (the sum of the two models' standard deviations over their seeds)."""
    label = METRICS[metric]
    (first, a), (second, b) = models.items()
    mean_a, mean_b = value(a, metric), value(b, metric)
    spread_a, spread_b = a["spread"][metric], b["spread"][metric]
    if spread_a is None or spread_b is None:
        return f"{label}: one seed, no spread to judge a difference by (run with --seeds 3)"
    higher = first if mean_a >= mean_b else second
    difference, spread = abs(mean_a - mean_b), spread_a + spread_b
    if difference == 0:
        return f"{label}: the same for both models: no difference"
    if difference > spread:
        return f"{label}: {names[higher]} higher by {_format(metric, difference)}, more than the spread " \
               f"({_format(metric, spread)}): a difference"
    return f"{label}: {names[higher]} higher by {_format(metric, difference)}, within the spread " \
           f"({_format(metric, spread)}): no difference shown"


def _format(metric, amount):
    return f"{amount:,.0f} tokens/s" if metric.endswith("tokens_per_s") else f"{100 * amount:.1f} points"
