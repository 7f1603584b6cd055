"""Ray Serve's metric classes, recording what they are given: `record_ray_metrics`
swaps them in for `ray.serve.metrics.Counter`, `Histogram` and `Gauge`, so a test can
read what a replica would export without a Ray cluster. They are subclasses of Ray's
own, so Ray still checks every call's tags and values as it would in a replica."""

from __future__ import annotations

from collections import defaultdict

RAY_TAGS = ("application", "deployment", "replica")  # added by Ray Serve in a replica


def labels_key(tags: dict | None) -> tuple:
    return tuple(sorted((tags or {}).items()))


def record_ray_metrics(monkeypatch) -> list:
    """Patch `ray.serve.metrics`; returns the list every metric made from now on joins."""
    from ray.serve import metrics

    made = []

    class Counter(metrics.Counter):
        kind = "counter"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.values = defaultdict(float)
            made.append(self)

        def inc(self, value=1.0, tags=None):
            super().inc(value, tags)
            self.values[labels_key(tags)] += value

    class Histogram(metrics.Histogram):
        kind = "histogram"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts, self.sums = defaultdict(int), defaultdict(float)
            made.append(self)

        def observe(self, value, tags=None):
            super().observe(value, tags)
            self.counts[labels_key(tags)] += 1
            self.sums[labels_key(tags)] += value

    class Gauge(metrics.Gauge):
        kind = "gauge"

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.values = {}
            made.append(self)

        def set(self, value, tags=None):
            super().set(value, tags)
            self.values[labels_key(tags)] = value

    for cls in (Counter, Histogram, Gauge):
        monkeypatch.setattr(metrics, cls.__name__, cls)
    return made


def exported_names(metric) -> list[str]:
    """The names Ray 2.60 exports a metric under on its metrics port (seen on a live cluster)."""
    name = f"ray_{metric.info['name']}"
    if metric.kind == "counter":
        return [f"{name}_total"]
    if metric.kind == "histogram":
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    return [name]


def exported_samples(made: list) -> dict:
    """{(exported name, labels): value} of every recorded metric, as Ray would export
    them (without Ray's own tags, and without histogram buckets)."""
    samples = {}
    for metric in made:
        name = f"ray_{metric.info['name']}"
        if metric.kind == "counter":
            samples.update({(f"{name}_total", key): value for key, value in metric.values.items()})
        elif metric.kind == "histogram":
            samples.update({(f"{name}_count", key): value for key, value in metric.counts.items()})
            samples.update({(f"{name}_sum", key): value for key, value in metric.sums.items()})
        else:
            samples.update({(name, key): value for key, value in metric.values.items()})
    return samples
