"""repro_utils.bench on the CPU (the CI machine has no GPU: the CUDA-graph path is exercised by the chapters' gpu runs)."""

import pytest
import torch

from repro_utils import bench


def test_time_fn_times_a_call_and_names_its_method():
    calls = []

    def work():
        calls.append(1)
        return torch.ones(64, 64) @ torch.ones(64, 64)

    t = bench.time_fn(work)
    assert t.ms > 0 and len(calls) > 1
    assert t.method == "torch.utils.benchmark median"


def test_graph_is_a_cuda_option_and_the_cpu_timer_ignores_it():
    if torch.cuda.is_available():
        pytest.skip("on a GPU graph=True captures a CUDA graph")
    assert bench.time_fn(lambda: torch.zeros(8).sum(), graph=True).method == "torch.utils.benchmark median"


def test_ratio_is_baseline_over_candidate():
    assert bench.ratio(bench.Timing(3.0, "x"), bench.Timing(1.5, "x")) == 2.0


def test_ratios_gives_one_replicate_per_timed_pair_and_sees_a_real_speedup():
    big, small = torch.ones(256, 256), torch.ones(16, 16)
    rs = bench.ratios(lambda: big @ big, lambda: small @ small, replicates=3)
    assert len(rs) == 3 and all(r > 1 for r in rs)  # a 256³ matmul is far slower than a 16³ one on any CPU
    with pytest.raises(ValueError):
        bench.ratios(lambda: None, lambda: None, replicates=0)


def test_parts_records_results_errors_and_the_budget_and_saves_after_each_part(tmp_path):
    """The measurement scripts' runner: a part's dict with its wall time, a failing part's error without losing the
    others, parts not asked for left out, and after the budget a 'skipped' record; the JSON on disk after every part."""
    import json

    from repro_utils.bench import Parts

    res = {"chapter": "x"}
    out = tmp_path / "sub" / "r.json"
    part = Parts(res, ["a", "boom", "c"], out=out, budget_s=3600, progress=False)
    part.setup_done()
    part("a", lambda: {"v": 1})
    assert json.loads(out.read_text())["parts"]["a"]["v"] == 1  # written before the next part starts
    part("boom", lambda: 1 / 0)
    part("not-asked", lambda: {"v": 2})
    part.budget_s = 0.0
    part("c", lambda: {"v": 3})
    part.close()
    got = json.loads(out.read_text())
    assert got["parts"]["boom"]["error"].startswith("ZeroDivisionError")
    assert "not-asked" not in got["parts"] and got["parts"]["c"]["skipped"].startswith("time budget")
    assert all("part_wall_s" in v for v in got["parts"].values()) and got["wall_s"] >= 0


def test_parts_skip_a_part_whose_expected_time_would_overrun_the_budget(tmp_path):
    """``need_s``: a part that would not end inside the budget is skipped before it starts, with its numbers."""
    from repro_utils.bench import Parts

    res = {}
    part = Parts(res, ["a", "b", "c"], out=tmp_path / "r.json", budget_s=100, progress=False)
    ran = []
    part("a", lambda: ran.append("a") or {}, need_s=1.0)
    part("b", lambda: ran.append("b") or {}, need_s=1000.0)
    part("c", lambda: ran.append("c") or {})
    part.close()
    assert ran == ["a", "c"]
    assert res["parts"]["b"]["skipped"].startswith("time budget: would not fit (needs about 1000 s")


def test_parts_bar_says_it_counts_the_setup(capsys):
    """The bar's last line stays in a notebook beside the script's "N parts in ..." line: it must not read as N + 1
    parts (chapter 06's page showed "13 parts" above a bar at 14/14)."""
    from repro_utils.bench import Parts

    part = Parts({}, ["a", "b"], desc="chX")
    part.setup_done()
    part("a", lambda: {})
    part("b", lambda: {})
    part.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "3/3" in last and "setup + 2 parts" in last, last


def test_script_args_refuse_unknown_parts_and_take_extras(capsys):
    import pytest

    from repro_utils.bench import script_args

    args, parts = script_args("doc", ["a", "b"], budget_s=10.0, argv=["--out", "x.json", "--parts", "b"],
                              extra=lambda ap: ap.add_argument("--workload-reps", type=int, default=2))
    assert parts == ["b"] and args.workload_reps == 2 and args.budget_s == 10.0 and not args.dry_run
    assert args.reps == 3 and not hasattr(script_args("doc", ["a"], budget_s=1.0, reps_help=None,
                                                      argv=["--out", "x"])[0], "reps")  # a script without replicates
    with pytest.raises(SystemExit):
        script_args("doc", ["a"], budget_s=1.0, argv=["--out", "x", "--parts", "a,zz"])
    assert "unknown parts" in capsys.readouterr().err
