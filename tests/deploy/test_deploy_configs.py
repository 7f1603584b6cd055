"""The shipped Prometheus config, alert rules and Grafana dashboard: Prometheus' own checker
passes them, the rules fire on series shaped as Ray exports them, and every ray_dcft_*
series they use is one the replicas export, with labels it has."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.metrics import ServeIngressMetrics, ServeReplicaMetrics
from tests.ray_metrics_fakes import RAY_TAGS, exported_names, record_ray_metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dcft-hub.json"

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool (Debian package `prometheus`) not installed")


def run_promtool(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard, with Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    # a variable's label_values(SELECTOR, LABEL) is Grafana's: its SELECTOR is PromQL
    queries += [re.sub(r"^label_values\((.*), *\w+\)$", r"\1", v["definition"])
                for v in board["templating"]["list"] if v["type"] == "query"]
    return [q.replace("$__rate_interval", "1m").replace("$application", "dcft-hub") for q in queries]


def rule_queries() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


@needs_promtool
def test_alert_rules_are_valid():
    assert "SUCCESS" in run_promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))


@needs_promtool
def test_alert_rules_fire_on_series_as_ray_exports_them():
    """deploy/prometheus/rules_test.yml: per-replica series summed per application."""
    assert "SUCCESS" in run_promtool("test", "rules", "rules_test.yml", cwd=PROMETHEUS_DIR)


@needs_promtool
def test_scrape_config_is_valid_and_scrapes_only_rays_metrics_ports(tmp_path):
    """Checked as deployed, the rules file beside the config. The app's /metrics (one
    Ingress replica's view) is not a scrape target: every series comes from Ray's ports."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["ray"]
    assert "metrics_path" not in config["scrape_configs"][0]
    shutil.copy(PROMETHEUS_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROMETHEUS_DIR / "rules.yml", tmp_path / "rules.yml")
    assert "SUCCESS" in run_promtool("check", "config", str(tmp_path / "prometheus.yml"))


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as a recording rule's expression."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(dashboard_queries())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in run_promtool("check", "rules", str(tmp_path / "dashboard.yml"))


def exported(monkeypatch) -> dict[str, set[str]]:
    """{exported series name: its labels} of everything an Ingress and an AdapterModel replica record."""
    made = record_ray_metrics(monkeypatch)
    ServeIngressMetrics(), ServeReplicaMetrics()
    series = {}
    for metric in made:
        for name in exported_names(metric):
            extra = {"le"} if name.endswith("_bucket") else set()
            series[name] = set(metric.info["tag_keys"]) | set(RAY_TAGS) | extra
    return series


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queries_use_only_series_and_labels_the_replicas_export(source, monkeypatch):
    series = exported(monkeypatch)
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    used = set()
    for query in queries:
        assert not re.search(r"(?<![\w])dcft_", query), f"a replica-local dcft_* series: {query}"
        for name, selector in re.findall(r"\b(ray_dcft_\w+)(?:\{([^}]*)\})?", query):
            assert name in series, f"{name} is not exported by any replica ({query})"
            for label in re.findall(r"(\w+)\s*[=!]~?", selector):
                assert label in series[name], f"{name} has no label {label}"
            used.add(name)
        names = re.findall(r"\bray_dcft_\w+", query)
        for group in re.findall(r"\bby\s*\(([^)]*)\)", query) if names else ():  # else Ray's own series
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert any(label in series[n] for n in names), f"no series of {query!r} has label {label}"
    assert used, f"the {source} uses no ray_dcft_* series"
