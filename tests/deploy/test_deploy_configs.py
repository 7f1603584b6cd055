"""The shipped Prometheus config and alert rules pass Prometheus' own checker."""

import shutil
from pathlib import Path

import pytest

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
SECRET = "/etc/prometheus/secrets/dcft-admin-key"

promtool = shutil.which("promtool")
pytestmark = pytest.mark.skipif(promtool is None, reason="promtool (Debian package `prometheus`) not installed")


def run_promtool(*args: str) -> str:
    import subprocess

    done = subprocess.run([promtool, "check", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_are_valid():
    assert "SUCCESS" in run_promtool("rules", str(PROMETHEUS_DIR / "rules.yml"))


def test_scrape_config_is_valid(tmp_path):
    """Checked as deployed: the admin key file in place, the rules file beside the config."""
    key = tmp_path / "dcft-admin-key"
    key.write_text("admin-key-0123456789abcdef")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert SECRET in config
    (tmp_path / "prometheus.yml").write_text(config.replace(SECRET, str(key)))
    shutil.copy(PROMETHEUS_DIR / "rules.yml", tmp_path / "rules.yml")
    assert "SUCCESS" in run_promtool("config", str(tmp_path / "prometheus.yml"))
