"""Run records: regrading a committed run, and the community path (`repro export` / `repro import`).
A tampered or mismatched record is refused with a clear error, and nothing changes."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from pathlib import Path
from unittest import mock

import pytest
from conftest import git_commit

from repro_utils import ledger
from repro_utils.check import check
from repro_utils.claims import load_chapter
from repro_utils.cli import main
from repro_utils.records import RecordError, export_run, import_run, regrade_data
from repro_utils.run import ReplicatesError, ReplicatesWarning, Run, card


def user_run(course: Path, device: str = "NVIDIA H200", replicates: int = 3) -> Path:
    """A user's gpu run of the self-test at the course's HEAD, as `repro run` leaves it in _build/runs/gpu."""
    ch = load_chapter(course / "chapters" / "00_selftest")
    run = Run(chapter=ch, params={"profile": "gpu", "seed": 0, "n": 1000000, "method": "torch"},
              started="2026-12-04T12:00:00+00:00", t0=time.time())
    with mock.patch("repro_utils.run.reference_gpu", return_value=True):
        run.record("uniform-mean", values=[0.5001, 0.5, 0.4999][:replicates], setting="n=1000000, torch")
        run.record("needs-gpu", 1.8, setting="H200")
    data = run.to_dict()
    data["fingerprint"]["device"] = device
    data["fingerprint"]["dirty"] = False
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=course, capture_output=True, text=True, check=True)
    data["fingerprint"]["commit"] = head.stdout.strip()  # the course's commit, as a user's clone would record
    path = course / "_build" / "runs" / "gpu" / "00_selftest.json"
    ledger.write(path, data)
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".git" not in p.parts and "_build" not in p.parts}


def test_export_then_import_adds_the_run_as_its_devices(course, tmp_path):
    rec = export_run(course, "00", user_run(course), tmp_path / "rec.json")
    dest = import_run(course, rec)
    assert dest == course / "results" / "gpu" / "00_selftest" / "nvidia-h200.json"
    assert json.loads(dest.read_text())["imported"]["from"] == "rec.json"
    assert check(course) == []


@pytest.mark.parametrize("tamper,needle", [
    (lambda r: r["ledger"]["claims"][1]["measured"].update(value=3.0), "sha256 does not match"),
    (lambda r: r.update(format="something"), "not a run record"),
    (lambda r: r["ledger"]["fingerprint"].update(commit="0" * 40), "not in this repository's history"),
    (lambda r: r["ledger"]["fingerprint"].update(dirty=True), "modified tree"),
    (lambda r: r["ledger"]["claims"][1].update(grade="Not reproduced"), "do not re-derive"),
    (lambda r: r["ledger"].update(chapter="42_nothing"), "unknown chapter"),
    (lambda r: r.update(claims_yaml="chapter: 00_selftest\n"), "not the one at commit"),
    (lambda r: r["ledger"]["fingerprint"].update(device="CPU (x86_64, 2 cores)"), "only gpu/full runs on a GPU"),
])
def test_a_tampered_or_mismatched_record_is_refused_and_changes_nothing(course, tmp_path, capsys, tamper, needle):
    from repro_utils.records import _canonical

    rec = export_run(course, "00", user_run(course), tmp_path / "rec.json")
    r = json.loads(rec.read_text())
    tamper(r)
    if needle != "sha256 does not match":  # re-sign, so that the deeper check is the one that fires
        import hashlib

        r["sha256"] = hashlib.sha256(_canonical(r["ledger"])).hexdigest()
    rec.write_text(json.dumps(r))
    before = tree(course)
    assert main(["--root", str(course), "import", str(rec)]) == 2
    assert needle in capsys.readouterr().err
    assert tree(course) == before


def test_an_under_replicated_run_cannot_be_imported(course, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReplicatesWarning)
        rec = export_run(course, "00", user_run(course, replicates=1), tmp_path / "rec.json")
    with pytest.raises(RecordError, match="fewer replicates than declared"):
        import_run(course, rec)


def test_import_never_replaces_a_devices_run_unless_asked(course, tmp_path):
    rec = export_run(course, "00", user_run(course), tmp_path / "rec.json")
    import_run(course, rec)
    git_commit(course, "imported")
    with pytest.raises(RecordError, match="already holds a run"):
        import_run(course, rec)
    assert import_run(course, rec, replace=True).is_file()


def test_too_few_replicates_warn_at_record_time_and_a_gpu_run_refuses_to_finish(course, tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_OUT", str(tmp_path))
    ch = load_chapter(course / "chapters" / "00_selftest")
    run = Run(chapter=ch, params={"profile": "gpu", "seed": 0, "n": 100, "method": "torch"},
              started="2026-12-04T12:00:00+00:00", t0=time.time())
    with pytest.warns(ReplicatesWarning, match="declares 3 replicates; this run recorded 1"):
        g = run.record("uniform-mean", 0.5, setting="one draw")
    assert g.rung == "Unverified" and "1 replicate recorded where 3 are declared" in g.reason
    with pytest.raises(ReplicatesError, match="cannot be published"):
        run.finish(show=False)
    assert (tmp_path / "00_selftest.json").is_file()  # nothing lost: the ledger was written first


def test_regrading_keeps_the_measurements_and_says_so(course):
    ch = load_chapter(course / "chapters" / "00_selftest")
    data = json.loads(user_run(course).read_text())
    data["schema_version"] = 1
    new = regrade_data(ch, data, note="new rules", commit="abc", date="2026-12-04")
    assert [c["measured"] for c in new["claims"]] == [c["measured"] for c in data["claims"]]
    assert new["regraded"][-1] == {"date": "2026-12-04", "commit": "abc", "note": "new rules"}
    again = regrade_data(ch, new, note="new rules", commit="abc", date="2026-12-04")
    assert len(again["regraded"]) == 1  # idempotent on one day


def test_the_card_is_slim_and_shows_goals_apart(course):
    data = json.loads(user_run(course).read_text())
    text = card(data)
    header = next(ln for ln in text.splitlines() if ln.startswith("| claim"))
    assert header == "| claim | claimed | measured (95% interval) | scale | grade |"
    assert "[0.4998, 0.5002]" in text  # the interval, not the mean alone
    for c in data["claims"]:  # the list below says each setting once (the reason already names both)
        bullet = next(ln for ln in text.splitlines() if ln.startswith(f"- **`{c['id']}`**"))
        assert bullet.count(c["declared"]["claimed"]["setting"]) == 1, bullet
        if c["measured"] and not c["measured"].get("why_untested"):
            assert bullet.count(c["measured"]["setting"]) == 1, bullet
        else:
            assert "not measured" in bullet or "Not tested" in bullet or "not tested" in bullet, bullet


def test_regrading_twice_with_the_same_moves_keeps_the_goals_measurements(course):
    """The second regrade no longer holds the moved claim: the goal keeps the measurement it took the first time."""
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text() + """goals:
  - id: gpu-goal
    goal: The self-test's GPU number stays at or above 1.5.
    metric: anything
    unit: x
    target: {at_least: 1.5}
    baseline: "none, a self-test"
    profiles: [gpu]
    deterministic: "a number the self-test writes down"
""")
    ch = load_chapter(course / "chapters" / "00_selftest")
    data = json.loads(user_run(course).read_text())
    once = regrade_data(ch, data, note="moved", commit="abc", date="2026-12-04", moved={"gpu-goal": "needs-gpu"})
    once["claims"] = [c for c in once["claims"] if c["id"] != "needs-gpu"]  # as when the claim was retired
    twice = regrade_data(ch, once, note="again", commit="abc", date="2026-12-04", moved={"gpu-goal": "needs-gpu"})
    assert once["goals"][0]["measured"]["value"] == twice["goals"][0]["measured"]["value"] == 1.8
    assert twice["goals"][0]["grade"] == "Met"
