"""umgr's metrics as a real Prometheus takes them (Debian's `prometheus`
package: the Makefile installs it): promtool accepts a live scrape and the
shipped scrape config, and a Prometheus server started here scrapes a
daemon and answers a query for a live target's resident bytes."""
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import DaemonProcess, wait_for
from test_metrics import free_port, hold, scrape_text

DEPLOY = Path(__file__).parent.parent / "deploy"
MiB = 1 << 20


def test_promtool_accepts_the_shipped_scrape_config():
    checked = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_dashboard_selects_by_job_and_instance_and_shows_every_metric(tmp_path, programs, shim):
    """Sums never mix hosts: every query selects $job and $instance; every
    family a daemon serves is on a panel, as are its process's CPU and memory."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"job", "instance", "name"} <= set(variables)
    queries = dashboard_queries()
    assert all('job=~"$job"' in q and 'instance=~"$instance"' in q for q in queries), queries
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] for t in p["targets"])
    port = free_port()
    daemon = DaemonProcess(tmp_path, "--metrics-port", str(port))
    try:
        families = {line.split()[2] for line in scrape_text(port).splitlines() if line.startswith("# TYPE umgr_")}
    finally:
        daemon.stop()
    shown = " ".join(queries)
    missing = [f for f in sorted(families | {"process_cpu_seconds", "process_resident_memory_bytes"})
               if f not in shown]
    assert not missing, f"metrics on no dashboard panel: {missing}"


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        answer = json.load(urllib.request.urlopen(url, timeout=5))
    except urllib.error.HTTPError as exc:  # a query Prometheus refuses
        raise AssertionError(f"{expr}: {exc}: {exc.read().decode()}") from None
    except OSError:
        return []  # not up yet
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.timeout(90)
def test_prometheus_scrapes_a_live_target(tmp_path, programs, shim):
    metrics_port, prom_port = free_port(), free_port()
    daemon = DaemonProcess(tmp_path, "--max-resident", "8M", "--metrics-port", str(metrics_port))
    target = prom = None
    try:
        target = hold(programs, daemon.env(shim, UMGR_NAME="promtest"), 24)

        lint = subprocess.run(["promtool", "check", "metrics"], input=scrape_text(metrics_port),
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr

        config = tmp_path / "prometheus.yml"
        config.write_text("scrape_configs:\n  - job_name: umgr\n    scrape_interval: 1s\n"
                          f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(["prometheus", f"--config.file={config}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                                    stdout=subprocess.DEVNULL, stderr=log)
        expr = 'umgr_resident_bytes{job="umgr", name="promtest"}'
        result = wait_for(lambda: query(prom_port, expr), 30, f"Prometheus to answer {expr}", interval=0.5)
        assert len(result) == 1, result
        assert result[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"
        assert 0 < float(result[0]["value"][1]) <= 8 * MiB
        build = query(prom_port, 'umgr_build_info{job="umgr"}')
        assert len(build) == 1 and build[0]["metric"]["version"]
        # Every dashboard query parses and runs on this Prometheus.
        for expr in dashboard_queries():
            concrete = expr.replace("$__rate_interval", "1m")
            for variable in ("$job", "$instance", "$name"):
                concrete = concrete.replace(variable, ".*")
            query(prom_port, concrete)
        with pytest.raises(AssertionError, match="parse error"):  # and a bad one would be noticed
            query(prom_port, "sum by (")
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)
        if target is not None:
            target.kill()
            target.communicate()
        daemon.stop()
