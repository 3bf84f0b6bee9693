"""The `repro` command end to end on the self-test chapter: a run grades its claims into a ledger,
bad input gets a clear error and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PENDING_GOAL

from repro_utils.cli import main


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".git" not in p.parts}


@pytest.mark.slow
def test_run_executes_grades_and_writes_the_ledger(course, tmp_path, capsys):
    committed = (course / "chapters" / "00_selftest" / "00_selftest.ipynb").read_bytes()
    out = tmp_path / "out"
    assert main(["--root", str(course), "run", "00", "--profile", "smoke", "-p", "n=20000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Claim card: 00_selftest" in printed and "Reproduced at reduced scale" in printed
    data = json.loads((out / "00_selftest.json").read_text())
    assert data["parameters"]["n"] == 20000 and data["profile"] == "smoke"
    grades = {c["id"]: c["grade"] for c in data["claims"]}
    assert grades == {"uniform-mean": "Reproduced at reduced scale", "needs-gpu": "Unverified"}
    assert "smoke profile cannot test" in data["claims"][1]["reason"]
    fp = data["fingerprint"]
    assert fp["device"].startswith("CPU") and fp["torch"] and fp["commit"] != "unknown" and fp["wall_seconds"] > 0
    assert (out / "00_selftest.ipynb").is_file()
    # a smoke run never touches the committed notebook or results/
    assert (course / "chapters" / "00_selftest" / "00_selftest.ipynb").read_bytes() == committed
    assert not (course / "results").exists()
    # and it cannot be published
    assert main(["--root", str(course), "publish", "00", str(out)]) == 2
    assert "never replaces the committed outputs" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["run", "00", "-p", "bogus=1"], "unknown parameter 'bogus'"),
    (["run", "00", "-p", "n=abc"], "parameter 'n': 'abc' is a str, expected int"),
    (["run", "00", "-p", "method=jax"], "'jax' is not allowed; allowed values: 'torch', 'numpy'"),
    (["run", "00", "-p", "profile=gpu"], "pass the profile with --profile"),
    (["run", "00", "--profile", "gpu"], "needs a CUDA GPU"),
    (["run", "42"], "unknown chapter '42'; chapters are: 00_selftest"),
    (["book", "--profile", "gpu"], "needs a CUDA GPU"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(course, capsys, args, needle):
    before = tree(course)
    assert main(["--root", str(course), *args]) == 2
    assert needle in capsys.readouterr().err
    assert tree(course) == before


def test_malformed_claims_yaml_is_a_clear_error(course, capsys):
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text().replace("holds_if: {at_least: 1.5}", "holds_if: {at_leest: 1.5}"))
    assert main(["--root", str(course), "run", "00"]) == 2
    err = capsys.readouterr().err
    assert "claims.yaml" in err and "'needs-gpu'" in err and "holds_if" in err


def test_check_fails_on_a_hand_edited_ledger(course, capsys):
    from test_ledger_check import gpu_ledger

    path = gpu_ledger(course)
    assert main(["--root", str(course), "check"]) == 0
    data = json.loads(path.read_text())
    data["claims"][1]["grade"] = "Partially reproduced"
    path.write_text(json.dumps(data))
    assert main(["--root", str(course), "check"]) == 1
    assert "stored grade 'Partially reproduced'" in capsys.readouterr().out


def test_list_shows_claims_profiles_and_minutes(course, capsys):
    assert main(["--root", str(course), "list"]) == 0
    out = capsys.readouterr().out
    assert "00_selftest" in out and "uniform-mean" in out and "smoke ~0.2 min" in out and "tested by: gpu" in out


def test_list_marks_pending_declarations_and_shows_goals(course, capsys):
    f = course / "chapters" / "00_selftest" / "claims.yaml"
    f.write_text(f.read_text() + PENDING_GOAL)
    assert main(["--root", str(course), "list"]) == 0
    out = capsys.readouterr().out
    assert "goal later-goal: A target declared" in out and "tested by: gpu; declared 2026-12-05, not yet run" in out
    assert "uniform-mean" in out and "uniform-mean: The mean of n samples of U(0, 1) is 1/2.  [tested by: smoke, gpu]" in out
