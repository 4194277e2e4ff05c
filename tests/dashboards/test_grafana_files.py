import json
from pathlib import Path

import yaml

from tests.dashboards.grafana_macros import ALL, Variable, expand

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "dashboards"
PLUGIN = "grafana-clickhouse-datasource"


def test_expansion_matches_the_plugin_macros() -> None:
    variables = {"route": Variable(["a", "b"], ["a", "b", "c"]), "user": Variable([ALL], ["x", "y"])}
    sql = ("SELECT $__timeInterval(ts) AS time, $__interval_s AS s FROM t WHERE $__timeFilter(ts) "
           "AND $__conditionalAll(route IN (${route:singlequote}), $route) "
           "AND $__conditionalAll(user IN (${user:singlequote}), $user) AND model IN ($route) "
           "AND ts BETWEEN $__fromTime AND $__toTime")
    assert expand(sql, variables, 100, 200, 60) == (
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 60 second) AS time, 60 AS s FROM t "
        "WHERE ts >= toDateTime(100) AND ts <= toDateTime(200) AND route IN ('a','b') AND 1=1 "
        "AND model IN ('a','b') AND ts BETWEEN toDateTime(100) AND toDateTime(200)"
    )


def test_provisioning_points_grafana_at_the_dashboards_and_datasource() -> None:
    datasources = yaml.safe_load((DASHBOARDS_DIR / "provisioning/datasources/clickhouse.yaml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == PLUGIN and source["jsonData"]["defaultDatabase"] == "lockgate"
    providers = yaml.safe_load((DASHBOARDS_DIR / "provisioning/dashboards/lockgate.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"

    titles = set()
    for path in sorted((DASHBOARDS_DIR / "grafana").glob("*.json")):
        dashboard = json.loads(path.read_text())
        titles.add(dashboard["title"])
        refs = [panel["datasource"] for panel in dashboard["panels"]]
        refs += [target["datasource"] for panel in dashboard["panels"] for target in panel["targets"]]
        refs += [variable["datasource"] for variable in dashboard["templating"]["list"]]
        assert all(ref == {"type": PLUGIN, "uid": source["uid"]} for ref in refs), path.name
        assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert titles == {"lockgate: overview", "lockgate: cost and usage", "lockgate: governance",
                      "lockgate: traffic split"}
