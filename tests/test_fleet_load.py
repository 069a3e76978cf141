"""scripts/fleet-load at CI size: a few dozen simulated devices on one broker and through a
bridged pair, a broker restart in the middle, every event stored exactly once. The figures are
printed, not judged: this machine's speed varies; what must hold is that nothing is lost."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fleet_load_loses_nothing_on_one_broker_and_through_a_bridge(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run([str(REPO / "scripts" / "fleet-load"), "--devices", "30", "--processes", "2",
                           "--duration", "10", "--turn-interval", "2", "--rounds", "2", "--json", str(out),
                           "--keep", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["topology"]: r for r in json.loads(out.read_text())}
    assert sorted(results) == ["bridged", "single"]
    for topology, r in results.items():
        assert r["ok"] is True, (topology, r)
        assert r["online"]["all"] and r["online"]["seen"] == 30
        assert r["command"]["answered_min"] == 30 and r["command"]["round_trip_ms"]["p99"] > 0
        ev = r["events"]
        assert ev["sent"] > 100 and ev["stored"] == ev["sent"] and ev["lost"] == 0 and ev["devices_with_gaps"] == 0
        assert ev["extra"] == 0 and ev["outbox_dropped"] == 0
        assert ev["received_by_consumers"] == ev["stored"] + ev["duplicates_removed"]
        assert len(ev["stored_by_consumer"]) == 2 and all(n > 0 for n in ev["stored_by_consumer"])
        assert r["restart"]["down_s"] > 0
        assert set(r["resources"]) >= {"devices", "record", "fleet client"}
    assert results["single"]["restart"]["reconnected"]["devices"] == 30
    assert results["bridged"]["restart"]["broker"] == "central"
    assert "fleet-load: PASS" in proc.stdout
