"""The ledger and `repro check`: grades re-derive from measurements; hand edits, stale tests, silent
grade changes and stale scoreboards are caught."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
from pathlib import Path
from unittest import mock

import nbformat
import pytest
from conftest import PENDING_CLAIM, PENDING_GOAL, git_commit

from repro_utils import ledger, scoreboard
from repro_utils.check import check
from repro_utils.claims import load_chapter
from repro_utils.run import Run

ROOT = Path(__file__).resolve().parents[1]


def gpu_ledger(course: Path, mean: float = 0.5003, needs_gpu: float | None = 1.8, on_reference_gpu: bool = True,
               spread: float = 1e-4) -> Path:
    """A ledger as a gpu run of the self-test chapter writes it (built with the same Run API)."""
    ch = load_chapter(course / "chapters" / "00_selftest")
    run = Run(chapter=ch, params={"profile": "gpu", "seed": 0, "n": 1000000, "method": "torch"},
              started="2026-11-24T12:00:00+00:00", t0=time.time())
    with mock.patch("repro_utils.run.reference_gpu", return_value=on_reference_gpu):
        run.record("uniform-mean", values=[mean - spread, mean, mean + spread], setting="n=1000000, torch")
        if needs_gpu is not None:
            run.record("needs-gpu", needs_gpu, setting="H100")
    data = run.to_dict()
    path = ledger.path_for(course, data)
    ledger.write(path, data)
    scoreboard.write(course)
    return path


def test_a_consistent_course_passes(course):
    gpu_ledger(course)
    assert check(course) == []


def test_the_committed_course_passes_repro_check():
    assert check(ROOT) == []


def test_a_hand_edited_grade_is_caught(course):
    path = gpu_ledger(course)
    data = json.loads(path.read_text())
    data["claims"][1]["grade"] = "Reproduced"  # 1.8x ≥ 1.5x is Reproduced already; make it lie the other way
    data["claims"][0]["grade"] = "Reproduced"  # reduced scale cannot be Reproduced
    path.write_text(json.dumps(data))
    problems = check(course)
    assert any("'uniform-mean'" in p and "stored grade 'Reproduced'" in p for p in problems), problems


def test_a_hand_edited_measurement_is_caught(course):
    path = gpu_ledger(course)
    data = json.loads(path.read_text())
    data["claims"][1]["measured"]["value"] = 1.0  # below 1.5: no longer Reproduced
    path.write_text(json.dumps(data))
    assert any("'needs-gpu'" in p and "grades 'Not reproduced'" in p for p in check(course))


def test_a_ledger_that_breaks_the_schema_is_caught(course):
    path = gpu_ledger(course)
    data = json.loads(path.read_text())
    del data["fingerprint"]["device"]
    path.write_text(json.dumps(data))
    assert any("fingerprint" in p and "device" in p for p in check(course))


def test_a_test_loosened_after_the_run_is_caught(course):
    gpu_ledger(course)
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text().replace("holds_if: {at_least: 1.5}", "holds_if: {at_least: 1.0}"))
    assert any("changed its test since the run" in p for p in check(course))


def test_a_grade_change_between_commits_needs_a_dated_correction(course):
    gpu_ledger(course, needs_gpu=1.8)
    git_commit(course, "first gpu run")
    gpu_ledger(course, needs_gpu=1.2)  # Reproduced -> Not reproduced
    git_commit(course, "second gpu run")
    problems = check(course)
    assert any("'needs-gpu' went from 'Reproduced' to 'Not reproduced'" in p for p in problems), problems
    corr = course / "book" / "corrections.md"
    corr.write_text(corr.read_text() + "\n## Log\n- 2026-11-25 · 00_selftest / needs-gpu · Reproduced → Not reproduced · rerun\n")
    # the same protocol graded two ways by two runs of one device: unstable, and that needs explaining too
    problems = check(course)
    assert len(problems) == 1 and "'needs-gpu' is unstable" in problems[0], problems
    corr.write_text(corr.read_text() + "- 2026-11-25 · 00_selftest / needs-gpu · unstable · the second run used a "
                    "slower kernel\n")
    scoreboard.write(course)  # the scoreboard marks the claim "unstable (explained in Corrections)"
    assert "**unstable** (explained in Corrections)" in (course / "book" / "scoreboard.md").read_text()
    assert check(course) == []


def test_a_second_devices_ledger_is_not_read_as_the_firsts_next_version(course):
    """git log --follow takes a new file that closely resembles an old one for a rename: the H200 ledger of a
    chapter, added beside its H100 one, must not inherit the H100's grades as its own earlier version."""
    first = gpu_ledger(course, needs_gpu=1.2)  # H100: Not reproduced
    git_commit(course, "an H100 run")
    data = json.loads(first.read_text())
    data["fingerprint"]["device"] = "NVIDIA H200"
    data["claims"][1]["measured"]["value"] = 1.8  # Reproduced on the second device
    data["claims"][1]["grade"] = "Reproduced"
    second = ledger.path_for(course, data)
    assert second != first
    ledger.write(second, data)
    scoreboard.write(course)
    git_commit(course, "an H200 run beside it")
    assert not any("went from" in p for p in check(course)), check(course)


def test_stable_yes_needs_two_runs_that_decided_the_claim(course):
    """The scoreboard's "stable?" column (rule 9): a device whose run did not test a claim replicates nothing,
    so one decided grade beside an untested one reads "decided once"; two agreeing decided grades read "yes"."""
    def row(cid):
        return next(ln for ln in (course / "book" / "scoreboard.md").read_text().splitlines()
                    if ln.startswith(f"| {cid} |"))

    first = gpu_ledger(course, needs_gpu=1.8)  # H100: needs-gpu Reproduced
    data = json.loads(first.read_text())
    data["fingerprint"]["device"] = "NVIDIA H200"
    ledger.write(ledger.path_for(course, data), data)
    scoreboard.write(course)
    assert row("needs-gpu").endswith("| yes |"), row("needs-gpu")
    gpu_ledger(course, needs_gpu=None)  # the H100 run leaves needs-gpu untested
    assert row("needs-gpu").endswith("| decided once |"), row("needs-gpu")


def test_an_uncommitted_grade_change_needs_one_too(course):
    gpu_ledger(course, needs_gpu=1.8)
    git_commit(course, "first gpu run")
    gpu_ledger(course, needs_gpu=None)  # now Unverified, not yet committed
    assert any("'needs-gpu'" in p and "working tree" in p for p in check(course))


def test_a_stale_scoreboard_is_caught(course):
    gpu_ledger(course)
    (course / "book" / "scoreboard.md").write_text("# Scoreboard\n")
    assert check(course) == ["book/scoreboard.md is out of date: run `repro scoreboard`"]


def test_committed_outputs_from_a_smoke_run_are_caught(course, tmp_path):
    gpu_ledger(course)
    nb_path = course / "chapters" / "00_selftest" / "00_selftest.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="hello")]
    nb.metadata["papermill"] = {"parameters": {"profile": "smoke"}}
    nbformat.write(nb, nb_path)
    assert any("committed outputs come from a 'smoke' run" in p for p in check(course))


def test_studied_code_edited_after_the_published_run_is_caught(course):
    """A published notebook shows a function's source (display.show); editing that function afterwards
    without rerunning would make the book show code that never ran."""
    from repro_utils.display import source

    gpu_ledger(course)
    chapter = course / "chapters" / "00_selftest"
    module = chapter / "selftest_code.py"
    module.write_text("import math\n\n\nclass Sampler:\n    def mean(self, xs):\n        total = sum(xs)\n\n"
                      "        return total / len(xs)\n\n\ndef spread(xs):\n    return max(xs) - min(xs)\n")
    spec = importlib.util.spec_from_file_location("selftest_code", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shown = "\n\n\n".join([source(mod.Sampler.mean), source(mod.spread)])  # what show(mean, spread) renders
    nb_path = chapter / "00_selftest.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": f"```python\n{shown}\n```"})]
    nb.metadata["papermill"] = {"parameters": {"profile": "gpu"}}
    nbformat.write(nb, nb_path)
    assert check(course) == []  # the method (dedented, with its blank line) and the function are found
    module.write_text(module.read_text().replace("return total / len(xs)", "return total / max(1, len(xs))"))
    problems = check(course)
    assert len(problems) == 1 and "shows code that is no longer in the chapter's modules" in problems[0], problems
    assert "def mean(self, xs):" in problems[0]


def test_studied_code_from_another_chapters_module_counts_only_where_the_notebook_imports_it(course):
    """Chapter 08 shows chapter 01's functions (it runs chapter 01's module): shown code may come from another chapter's
    folder only when the notebook's code puts that folder on the import path, and is checked there like its own."""
    from repro_utils.display import source

    gpu_ledger(course)
    chapter = course / "chapters" / "00_selftest"
    lender = course / "chapters" / "99_lender"
    lender.mkdir()
    module = lender / "lent_code.py"
    module.write_text("def spread(xs):\n    return max(xs) - min(xs)\n")
    spec = importlib.util.spec_from_file_location("lent_code", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    nb_path = chapter / "00_selftest.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("display_data",
                                                  data={"text/markdown": f"```python\n{source(mod.spread)}\n```"})]
    nb.metadata["papermill"] = {"parameters": {"profile": "gpu"}}
    nbformat.write(nb, nb_path)
    assert any("def spread(xs):" in p for p in check(course))  # not imported: not the chapter's code
    nb.cells[2].source = 'import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path("../99_lender")))\n' + nb.cells[2].source
    nbformat.write(nb, nb_path)
    assert not any("def spread(xs):" in p for p in check(course))
    module.write_text(module.read_text().replace("max(xs) - min(xs)", "abs(max(xs) - min(xs))"))
    assert any("def spread(xs):" in p and "no longer" in p for p in check(course))  # edited after the run


def test_a_notebook_whose_parameters_differ_from_claims_is_caught(course):
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text().replace("  method:\n", "  meth:\n"))
    assert any("parameters cell assigns" in p for p in check(course))


def test_a_claim_added_after_the_run_needs_a_rerun(course):
    gpu_ledger(course)
    src = course / "chapters" / "00_selftest" / "claims.yaml"
    text = src.read_text() + """  - id: added-later
    claim: A claim declared after the run happened.
    source: {paper: "x", where: "y"}
    metric: m
    unit: x
    claimed: {value: 1, setting: s}
    holds_if: {at_least: 1}
    profiles: {gpu: own}
    deterministic: "an exact count, the same every run"
"""
    src.write_text(text)
    assert any("'added-later' is declared but the run did not grade it" in p for p in check(course))


@pytest.fixture
def no_git(course):
    shutil.rmtree(course / ".git")
    return course


def test_check_works_without_git_history(no_git):
    gpu_ledger(no_git)
    assert check(no_git) == []


def test_a_gpu_run_off_the_reference_gpu_is_graded_at_reduced_scale(course):
    data = json.loads(gpu_ledger(course, needs_gpu=1.8, on_reference_gpu=False).read_text())
    entry = data["claims"][1]
    assert entry["grade"] == "Reproduced at reduced scale"  # 1.8x passes, but not on an H100/H200
    assert entry["measured"]["scale"] == "reduced" and "reference" in entry["measured"]["note"]
    assert check(course) == []


# --- the evidence standard in `repro check` ------------------------------------------------------

def device_ledger(course: Path, device: str, needs_gpu: float | None, **kw) -> Path:
    """The self-test's gpu ledger as if run on ``device``."""
    path = gpu_ledger(course, needs_gpu=needs_gpu, **kw)
    data = json.loads(path.read_text())
    path.unlink()
    data["fingerprint"]["device"] = device
    dest = ledger.path_for(course, data)
    ledger.write(dest, data)
    scoreboard.write(course)
    return dest


def test_two_devices_that_disagree_make_the_claim_unstable_until_explained(course):
    device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    device_ledger(course, "NVIDIA H200", 1.2)  # Reproduced on one, Not reproduced on the other
    problems = check(course)
    assert len(problems) == 1 and "'needs-gpu' is unstable" in problems[0] and "NVIDIA H200" in problems[0], problems
    board = (course / "book" / "scoreboard.md").read_text()
    assert "H100 80GB HBM3 · gpu" in board and "H200 · gpu" in board and "**unstable**" in board
    corr = course / "book" / "corrections.md"
    corr.write_text(corr.read_text() + "\n## Log\n- 2026-12-04 · 00_selftest / needs-gpu · unstable · the H200's "
                    "faster memory speeds up the baseline only\n")
    scoreboard.write(course)
    assert check(course) == []


def test_publishing_one_device_never_touches_another_devices_run(course):
    a = device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    before = a.read_bytes()
    b = device_ledger(course, "NVIDIA H200", 1.9)
    assert a != b and a.read_bytes() == before and b.is_file()


def test_a_metric_changed_under_an_old_id_is_caught(course):
    gpu_ledger(course)
    git_commit(course, "a published run under schema 2")
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text().replace("metric: anything", "metric: something else"))
    problems = check(course)
    assert any("'needs-gpu': its metric, unit or test changed under the same id" in p for p in problems), problems


def test_a_hand_edited_replicate_is_caught(course):
    path = gpu_ledger(course)
    data = json.loads(path.read_text())
    m = data["claims"][0]["measured"]
    m["values"][0] += 0.003  # a replicate nudged by hand; value no longer their mean
    path.write_text(json.dumps(data))
    assert any("'uniform-mean'" in p and "inconsistent" in p for p in check(course))
    m["value"] = sum(m["values"]) / 3  # and the mean fixed up too: the stored interval gives it away
    path.write_text(json.dumps(data))
    assert any("'uniform-mean'" in p and "hand-edited replicate" in p for p in check(course))


def test_a_ledger_in_the_old_layout_is_caught(course):
    path = gpu_ledger(course)
    old = course / "results" / "gpu" / "00_selftest.json"
    old.write_text(path.read_text())
    assert any("old layout" in p for p in check(course))


def test_a_schema_1_ledger_must_be_regraded(course):
    path = gpu_ledger(course)
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    path.write_text(json.dumps(data))
    assert any("predates the evidence standard" in p for p in check(course))


def test_agreeing_grades_under_different_run_parameters_read_protocols_differ(course):
    """Two devices that decided a claim alike count as a rerun ("yes") only where their runs had the same
    parameters; a different n (or training steps, batch size ...) makes them two protocols. The time budget, the
    sections run and the base seed do not."""
    def row(cid):
        return next(ln for ln in (course / "book" / "scoreboard.md").read_text().splitlines()
                    if ln.startswith(f"| {cid} |"))

    device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    h200 = device_ledger(course, "NVIDIA H200", 1.9)
    assert row("needs-gpu").endswith("| yes |"), row("needs-gpu")
    data = json.loads(h200.read_text())
    data["parameters"].update(budget_s=99.0, seed=7)  # what a run may take, and another draw: the same protocol
    ledger.write(h200, data)
    scoreboard.write(course)
    assert row("needs-gpu").endswith("| yes |"), row("needs-gpu")
    data["parameters"]["n"] = 2000000  # a different run
    ledger.write(h200, data)
    scoreboard.write(course)
    assert row("needs-gpu").endswith("| yes (protocols differ) |"), row("needs-gpu")
    assert check(course) == []


def test_a_flip_under_the_same_declared_test_is_unstable_whatever_the_run_parameters(course):
    """The run's parameters are the chapter's, not the claim's: they never excuse a flip (a kernel timing does not
    depend on how long chapter 04 trained its model), so `repro check` still asks Corrections to explain it."""
    device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    h200 = device_ledger(course, "NVIDIA H200", 1.2)  # Reproduced against Not reproduced
    data = json.loads(h200.read_text())
    data["parameters"]["n"] = 2000000
    ledger.write(h200, data)
    scoreboard.write(course)
    problems = check(course)
    assert len(problems) == 1 and "'needs-gpu' is unstable" in problems[0], problems


def test_untested_on_one_device_and_decided_on_another_is_not_unstable(course):
    device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    device_ledger(course, "NVIDIA H200", None)  # needs-gpu untested there: Unverified, no contradiction
    assert not any("unstable" in p for p in check(course))


def test_inconclusive_on_one_device_and_decided_on_another_is_unstable_until_explained(course):
    # uniform-mean holds within 0.5 ± 0.01. On the H100 its interval clears the bar; on the H200 three
    # replicates 0.505, 0.509, 0.513 give a t interval of about [0.499, 0.519], across 0.51: inconclusive.
    # The same protocol, carried out twice, graded two ways: the draw decided it (evidence standard, rule 9).
    device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    h200 = json.loads(device_ledger(course, "NVIDIA H200", 1.8, mean=0.509, spread=0.004).read_text())
    entry = next(c for c in h200["claims"] if c["id"] == "uniform-mean")
    assert entry["grade"] == "Unverified" and entry["reason"].startswith("Inconclusive: the interval"), entry
    problems = check(course)
    assert len(problems) == 1 and "'uniform-mean' is unstable" in problems[0], problems
    corr = course / "book" / "corrections.md"
    corr.write_text(corr.read_text() + "\n## Log\n- 2026-12-05 · 00_selftest / uniform-mean · unstable · three "
                    "replicates are too few for a bar this close\n")
    scoreboard.write(course)
    assert check(course) == []
    assert "**unstable** (explained in Corrections)" in (course / "book" / "scoreboard.md").read_text()




def run_grading_later_claim(course: Path, where: str) -> dict:
    """A gpu run of the self-test chapter, started 2026-12-06, that also grades 'later-claim' (as claims.yaml now
    declares it)."""
    run = Run(chapter=load_chapter(course / "chapters" / "00_selftest"),
              params={"profile": "gpu", "seed": 0, "n": 1000000, "method": "torch"},
              started="2026-12-06T12:00:00+00:00", t0=time.time())
    with mock.patch("repro_utils.run.reference_gpu", return_value=True):
        run.record("uniform-mean", values=[0.5, 0.5001, 0.4999], setting="n=1000000, torch")
        run.record("needs-gpu", 1.8, setting=where)
        run.record("later-claim", 1.7, setting=where)
    return run.to_dict()


def test_a_pending_declaration_waits_for_its_run_and_then_must_drop_the_mark(course):
    """Pre-registration: a claim or goal marked pending (with its date) is accepted while no run grades it, shown
    on the scoreboard as declared but not yet run, and left out of a run that does not record it; once a run
    grades it, `repro check` asks for the mark to go."""
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    text = f.read_text()
    f.write_text(text.replace("claims:\n", "claims:\n" + PENDING_CLAIM, 1) + PENDING_GOAL)
    path = gpu_ledger(course)
    data = json.loads(path.read_text())
    assert "later-claim" not in {c["id"] for c in data["claims"]} and data["goals"] == []
    assert check(course) == []
    board = (course / "book" / "scoreboard.md").read_text()
    assert board.count("declared 2026-12-05, not yet run") == 2
    # a regrade of the earlier run (a protocol strengthened elsewhere) leaves the pending declarations out
    from repro_utils.records import regrade_data

    again = regrade_data(load_chapter(f.parent), data, note="test", commit="0" * 40)
    assert "later-claim" not in {c["id"] for c in again["claims"]} and again["goals"] == []
    # the date is part of the mark
    f.write_text(text.replace("claims:\n", "claims:\n" + PENDING_CLAIM.replace("2026-12-05: ", ""), 1))
    with pytest.raises(Exception, match="pending"):
        load_chapter(f.parent)
    # a run that grades it: the mark must go
    f.write_text(text.replace("claims:\n", "claims:\n" + PENDING_CLAIM, 1))
    data = run_grading_later_claim(course, "H100")
    assert "pending" not in next(c for c in data["claims"] if c["id"] == "later-claim")["declared"]
    ledger.write(ledger.path_for(course, data), data)
    scoreboard.write(course)
    assert any("'later-claim' is graded by this run" in p and "remove `pending`" in p for p in check(course))


def test_a_claim_retired_after_a_run_stays_in_its_ledger_only_with_a_dated_retired_line(course):
    """Rule 7: a claim whose test changes is retired for a new id. Its old runs keep grading it (their history, not
    edited); `repro check` accepts that only where book/corrections.md retires it on a dated line, and says how."""
    gpu_ledger(course)
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    text = f.read_text()
    start = text.index("  - id: needs-gpu")
    end = text.find("\n  - id:", start + 1)
    f.write_text(text[:start] + (text[end + 1:] if end != -1 else ""))
    scoreboard.write(course)
    problems = check(course)
    assert any("'needs-gpu' is graded but no longer declared" in p and "retired as" in p for p in problems), problems
    log = course / "book" / "corrections.md"
    for line, ok in [("- 00_selftest / needs-gpu · retired as needs-gpu-2 · undated", False),
                     ("- 2026-12-06 · 00_selftest / uniform-mean · retired as another-id · not this claim", False),
                     ("- 2026-12-06 · 00_selftest / needs-gpu · Reproduced → Unverified · not a retirement", False),
                     ("- 2026-12-06 · 00_selftest / needs-gpu · retired as needs-gpu-2 (pending its first run) · why",
                      True)]:
        log.write_text("# Corrections\n\n## Log\n\n" + line + "\n")
        scoreboard.write(course)
        flagged = any("'needs-gpu' is graded but no longer declared" in p for p in check(course))
        assert flagged != ok, line
    assert check(course) == []
    assert "needs-gpu" not in (course / "book" / "scoreboard.md").read_text()  # the board shows declared claims only


def test_a_claim_declared_after_one_devices_run_is_excused_only_by_a_later_run_that_grades_it(course):
    """Two devices: the H100's run came before a claim was declared, the H200's after, and it grades the claim.
    The H100 ledger may lack it (the scoreboard says it was declared after that run); without the later run, or
    when the run that grades it is the older one, `repro check` asks for a rerun."""
    older = device_ledger(course, "NVIDIA H100 80GB HBM3", 1.8)
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text().replace("claims:\n", "claims:\n" + PENDING_CLAIM.replace(
        '    pending: "2026-12-05: graded by the next gpu run"\n', ""), 1))
    assert any("'later-claim' is declared but the run did not grade it" in p for p in check(course))
    data = run_grading_later_claim(course, "H200")
    data["fingerprint"]["device"] = "NVIDIA H200"
    newer = ledger.path_for(course, data)
    assert newer != older
    ledger.write(newer, data)
    scoreboard.write(course)
    assert check(course) == []
    assert "declared after this run (first run: H200)" in (course / "book" / "scoreboard.md").read_text()
    # the same two ledgers with their dates swapped: the ledger lacking the claim is now the later one
    a, b = json.loads(older.read_text()), json.loads(newer.read_text())
    a["fingerprint"]["started"], b["fingerprint"]["started"] = "2026-12-07T12:00:00+00:00", "2026-11-24T12:00:00+00:00"
    ledger.write(older, a)
    ledger.write(newer, b)
    scoreboard.write(course)
    assert any("h100" in p and "'later-claim' is declared but the run did not grade it" in p for p in check(course))


def test_a_staged_next_notebook_is_run_checked_and_published_in_place_of_the_old(course, tmp_path):
    """<chapter>.next.ipynb: the chapter's next version, committed without outputs while the published notebook
    keeps its run's. Runs execute it, `repro check` holds it to no outputs and the chapter's parameters (the
    published notebook may lack a parameter added for it), and publishing a run of it removes it."""
    from repro_utils.claims import load_chapter
    from repro_utils.execute import publish_run, run_chapter

    folder = course / "chapters" / "00_selftest"
    published = folder / "00_selftest.ipynb"
    nb = nbformat.read(published, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nb.cells.insert(len(nb.cells) - 1, nbformat.v4.new_code_cell('print("staged cell ran")'))
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += "\nlabel = None"
    staged = folder / "00_selftest.next.ipynb"
    nbformat.write(nb, staged)
    claims = folder / "claims.yaml"
    claims.write_text(claims.read_text().replace("parameters:\n", "parameters:\n  label:\n    type: str\n"
                                                 "    default: none\n    help: a parameter the staged version adds\n", 1))
    ch = load_chapter(folder)
    assert ch.source_notebook == staged
    gpu_ledger(course)
    assert check(course) == []  # the published notebook lacks `label`: allowed while the staged version has it
    # a smoke run executes the staged version
    r = run_chapter(course, ch, {"profile": "smoke", "n": 20000}, out=tmp_path / "smoke")
    assert r.ok, r.error
    ran = nbformat.read(tmp_path / "smoke" / "00_selftest.ipynb", as_version=4)
    assert any("staged cell ran" in "".join(o.get("text", "")) for c in ran.cells for o in c.get("outputs", []))
    # staged outputs, or parameters that disagree with claims.yaml, are problems
    bad = nbformat.read(staged, as_version=4)
    bad.cells[-2].outputs = [nbformat.v4.new_output("stream", text="x")]
    nbformat.write(bad, staged)
    assert any("staged notebook holds outputs" in p for p in check(course))
    nbformat.write(nb, staged)
    claims.write_text(claims.read_text().replace("  label:\n    type: str\n    default: none\n    help: a parameter "
                                                 "the staged version adds\n", ""))
    assert any("00_selftest.next.ipynb: parameters cell assigns" in p for p in check(course))
    claims.write_text(claims.read_text().replace("parameters:\n", "parameters:\n  label:\n    type: str\n"
                                                 "    default: none\n    help: a parameter the staged version adds\n", 1))
    # publishing a gpu run of it: the published notebook becomes the staged version, which goes
    ran.metadata.setdefault("papermill", {})["parameters"] = {"profile": "gpu"}
    executed = tmp_path / "gpu" / "00_selftest.ipynb"
    executed.parent.mkdir()
    nbformat.write(ran, executed)
    lg = tmp_path / "gpu" / "00_selftest.json"
    shutil.copyfile(device_ledger(course, "NVIDIA H200", 1.8), lg)
    publish_run(course, load_chapter(folder), executed, lg)
    assert not staged.exists()
    assert "staged cell ran" in published.read_text()


def test_the_published_notebook_keeps_a_parameter_its_run_was_given_that_the_staged_version_drops(course):
    """A parameter the staged version no longer declares (its section moved elsewhere) stays in the published
    notebook, which records the run it came from, as long as that run was given it; any other parameter claims.yaml
    no longer declares is still a problem, and so is the staged notebook assigning it."""
    gpu_ledger(course)
    folder = course / "chapters" / "00_selftest"
    published = folder / "00_selftest.ipynb"
    nb = nbformat.read(published, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "method" in params.source
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    params.source = "\n".join(ln for ln in params.source.splitlines() if not ln.startswith("method"))
    staged = folder / "00_selftest.next.ipynb"
    nbformat.write(nb, staged)
    claims = folder / "claims.yaml"
    text = claims.read_text()
    method = text[text.index("  method:\n"):text.index("claims:")]
    claims.write_text(text.replace(method, ""))
    ran = nbformat.read(published, as_version=4)
    ran.metadata["papermill"] = {"parameters": {"profile": "gpu", "n": 1000000}}
    nbformat.write(ran, published)
    assert any("00_selftest.ipynb: parameters cell assigns ['method']" in p for p in check(course))  # not given it
    ran.metadata["papermill"]["parameters"]["method"] = "torch"
    nbformat.write(ran, published)
    assert check(course) == []  # its run was given `method`: the published notebook records that run
    nb_bad = nbformat.read(staged, as_version=4)
    next(c for c in nb_bad.cells if "parameters" in c.metadata.get("tags", [])).source += "\nmethod = None"
    nbformat.write(nb_bad, staged)
    assert any("00_selftest.next.ipynb: parameters cell assigns" in p for p in check(course))


def test_a_staged_notebook_that_records_one_value_where_replicates_are_declared_fails_check(course):
    """The pre-flight that chapter 03's staged run lacked (its H200 run at d979339 finished and then could not be
    published): `repro check` reads the staged notebook's run.record / run.goal calls with a literal id, and a claim
    that declares replicates for a gpu run but is recorded without values=[...] is a problem before any device
    time is spent. A claim recorded with values, or one the smoke profile alone tests, passes."""
    folder = course / "chapters" / "00_selftest"
    nb = nbformat.read(folder / "00_selftest.ipynb", as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    staged = folder / "00_selftest.next.ipynb"
    nbformat.write(nb, staged)
    gpu_ledger(course)
    assert check(course) == []  # uniform-mean is recorded with values=means
    recording = next(c for c in nb.cells if 'run.record("uniform-mean"' in c.source)
    recording.source = recording.source.replace('run.record("uniform-mean", values=means,',
                                                'run.record("uniform-mean", float(sum(means) / len(means)),')
    nbformat.write(nb, staged)
    problems = [p for p in check(course) if "00_selftest.next.ipynb" in p]
    assert len(problems) == 1 and "run.record('uniform-mean', ...) passes one value" in problems[0]
    assert "declares 3 replicates" in problems[0]
    # a claim that declares replicates for smoke only is not a gpu run's concern
    claims = folder / "claims.yaml"
    claims.write_text(claims.read_text().replace("profiles: {smoke: reduced, gpu: reduced}\n    replicates: 3",
                                                 "profiles: {smoke: reduced}\n    replicates: 3", 1))
    assert not [p for p in check(course) if "passes one value" in p]


def test_a_rerun_patch_must_still_apply(course):
    """Edits to shown code wait in chapters/<chapter>/rerun.patch until the chapter's next run; `repro check`
    fails once the code they edit has moved under them."""
    f = course / "chapters" / "00_selftest" / "notes.txt"
    f.write_text("one\ntwo\n")
    git_commit(course, "a file to patch")
    f.write_text("one\n2\n")
    diff = subprocess.run(["git", "diff"], cwd=course, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "checkout", "--", "."], cwd=course, check=True)
    (course / "chapters" / "00_selftest" / "rerun.patch").write_text(diff)
    gpu_ledger(course)
    assert check(course) == []
    f.write_text("one\nzwei\n")  # the code moved: the patch's context no longer matches
    problems = check(course)
    assert len(problems) == 1 and "rerun.patch: no longer applies" in problems[0], problems


def test_a_regrade_stamps_a_claim_declared_after_the_run_and_the_scoreboard_does_not_count_it(course):
    """A regrade re-grades an older run under today's claims.yaml; a claim added since then was never that run's
    to test. The regrade stamps it from git (so that a clone without history renders the same table), and the
    scoreboard says "declared after this run" instead of counting it among the run's untested claims. A claim
    the run's own claims.yaml had but the run did not record stays the run's own "no measurement"."""
    from repro_utils.records import regrade

    path = gpu_ledger(course, needs_gpu=None)  # needs-gpu existed at this commit and was not recorded
    data = json.loads(path.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=course, capture_output=True, text=True, check=True)
    data["fingerprint"]["commit"] = head.stdout.strip()
    ledger.write(path, data)
    git_commit(course, "a gpu run")
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text().replace("claims:\n", "claims:\n" + PENDING_CLAIM.replace(
        '    pending: "2026-12-05: graded by the next gpu run"\n', ""), 1))
    git_commit(course, "a claim declared after the run")
    regrade(course, "00_selftest", note="test")
    entries = {c["id"]: c for c in json.loads(path.read_text())["claims"]}
    assert ledger.is_declared_after(entries["later-claim"])
    assert not ledger.is_declared_after(entries["needs-gpu"])
    scoreboard.write(course)
    board = (course / "book" / "scoreboard.md").read_text()
    row = next(ln for ln in board.splitlines() if ln.startswith("| later-claim |"))
    assert "Unverified" not in row and "declared after this run" in row, row
    assert "2 Unverified" not in board and "1 Unverified" in board  # needs-gpu only
