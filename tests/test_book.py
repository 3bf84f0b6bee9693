"""The book builds from the committed notebooks with warnings as errors (it never executes them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro_utils.execute import build_html

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_jupyter_book_builds_with_no_warnings(tmp_path):
    r = build_html(ROOT, path_output=tmp_path, capture=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "book" / "scoreboard.html").is_file()
    for ch in CHAPTERS:  # the published notebooks; a staged <chapter>.next.ipynb is not part of the book
        assert (html / ch.notebook.relative_to(ROOT).with_suffix(".html")).is_file(), ch.notebook
        assert not (html / ch.notebook.relative_to(ROOT).parent / f"{ch.id}.next.html").exists()
    assert not list(html.glob("chapters/*/*.next.html"))


# ---- the committed notebooks as a reader meets them (fast: no build) ------------------------------------

import ast  # noqa: E402
import copy  # noqa: E402

import nbformat  # noqa: E402

from repro_utils import ledger, notebooks  # noqa: E402
from repro_utils.claims import chapters  # noqa: E402

CHAPTERS = chapters(ROOT)


def _nb(ch):
    return nbformat.read(ch.notebook, as_version=4)


@pytest.mark.parametrize("ch", CHAPTERS, ids=lambda c: c.id)
def test_a_chapter_opens_with_its_title_then_how_to_run_it(ch):
    nb = _nb(ch)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {ch.id[:2]} · "), \
        f"{ch.notebook.name}: the first cell must be the title '# {ch.id[:2]} · ...', not {first.source[:60]!r}"
    note = nb.cells[1]
    assert note.get("metadata", {}).get("course", {}).get("generated") == notebooks.RUNNING_NOTE, \
        f"{ch.notebook.name}: the second cell must be the 'Running this chapter' note"
    assert note.source == notebooks.running_note(ch.minutes, nb.metadata["course"], ch.staged), \
        f"{ch.notebook.name}: the running note disagrees with claims.yaml's minutes: python -m repro_utils.notebooks"


@pytest.mark.parametrize("ch", CHAPTERS, ids=lambda c: c.id)
def test_the_sidebar_and_the_scoreboard_give_a_chapter_the_same_title(ch):
    """The sidebar shows the notebook's first heading; the scoreboard and the intro read claims.yaml's title."""
    for path in [ch.notebook, *ch.notebook.parent.glob("*.next.ipynb")]:
        first = nbformat.read(path, as_version=4).cells[0].source.splitlines()[0]
        assert first == f"# {ch.id[:2]} · {ch.title}", f"{path.name}: {first!r} against claims.yaml's {ch.title!r}"


@pytest.mark.parametrize("ch", CHAPTERS, ids=lambda c: c.id)
def test_setup_cells_are_hidden_and_run_all_uses_profile_auto(ch):
    nb = _nb(ch)
    roles = {}
    for cell in nb.cells:
        role = notebooks._role(cell)
        if role:
            roles[role] = cell
            assert notebooks.SETUP_TAGS[role] in cell.metadata.get("tags", []), \
                f"{ch.notebook.name}: the {role} cell lacks the tag {notebooks.SETUP_TAGS[role]!r}"
    assert set(roles) == {"colab", "parameters", "injected-parameters"}, f"{ch.notebook.name}: setup cells {sorted(roles)}"
    # the cell that starts the run and the imports and helpers after it: folded, right after the parameters
    setup = notebooks.setup_cells(nb)
    assert setup, f"{ch.notebook.name}: no code cell calls start(...)"
    assert all(c.cell_type != "markdown" or c.source.startswith("# ") or
               c.get("metadata", {}).get("course", {}).get("generated") for c in nb.cells[:setup[0]]), \
        f"{ch.notebook.name}: the setup comes after the chapter's text begins; move it up to the parameters"
    for i in setup:
        assert notebooks.SETUP_TAGS["setup"] in nb.cells[i].metadata.get("tags", []), \
            f"{ch.notebook.name}: setup cell {i} is not folded (hide-input): python -m repro_utils.notebooks"
    # "Run all" must not force the published run's profile: the injected cell assigns nothing
    body = ast.parse(roles["injected-parameters"].source).body
    assert body == [], f"{ch.notebook.name}: the injected-parameters cell still assigns values (profile 'gpu' on a reader)"
    assert 'profile = "auto"' in roles["parameters"].source
    # ... while the published run's parameters stay where `repro check` reads them
    assert nb.metadata["papermill"]["parameters"]["profile"] in ("gpu", "full")


@pytest.mark.parametrize("ch", CHAPTERS, ids=lambda c: c.id)
def test_colab_cell_clones_the_repository_the_launch_buttons_use(ch):
    nb = _nb(ch)
    url, branch = notebooks.repository(ROOT)
    meta = nb.metadata.get("course", {})
    assert {"min_compute_capability", "min_gpu_why"} <= set(meta), \
        f"{ch.notebook.name}: declare metadata.course.min_compute_capability and min_gpu_why"
    colab = next(c for c in nb.cells if notebooks._role(c) == "colab")
    assert colab.source == notebooks.colab_cell_source(url, branch, ch.id, meta["min_compute_capability"]), \
        f"{ch.notebook.name}: the Colab cell is not the one _config.yml's repository gives: python -m repro_utils.notebooks"
    assert f'"{url}"' in colab.source and f'"--branch", "{branch}"' in colab.source


@pytest.mark.parametrize("ch", CHAPTERS, ids=lambda c: c.id)
def test_outputs_hold_no_known_debris_and_tidying_changes_nothing(ch):
    nb = _nb(ch)
    assert notebooks.debris(nb) == [], f"{ch.notebook.name}: debris in outputs: python -m repro_utils.notebooks"
    again = copy.deepcopy(nb)
    shown = ledger.latest(ROOT, ch.id)[0].relative_to(ROOT)  # the run it shows
    notebooks.tidy(again, root=ROOT, chapter=ch.id, minutes=ch.minutes, ledger=str(shown),
                   staged=ch.staged)
    assert again == nb, f"{ch.notebook.name}: not tidy: python -m repro_utils.notebooks"


def test_tidy_removes_debris_and_keeps_every_number():
    text = ("/opt/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.\n"
            "  from .autonotebook import tqdm as notebook_tqdm\n"
            "step 1: loss 5.4691 (12.5 s)\n"
            "/tmp/ipykernel_1/2.py:32: UserWarning: Converting a tensor with requires_grad=True to a scalar may lead\n"
            "Consider using tensor.detach() first.\n"
            "  rel = lambda a: float(a)\n"
            "Generating train split: 10196 examples [00:00, 45542.00 examples/s]\n"
            "          \n\n\n"
            "/x/y.py:3: UserWarning: something new\n"
            "ledger: /root/out/01/01.json\n")
    out = notebooks.tidy_text(text, ledger="results/gpu/01.json")
    assert out == "step 1: loss 5.4691 (12.5 s)\n\n/x/y.py:3: UserWarning: something new\nledger: results/gpu/01.json\n", out
    # an unknown warning stays: the browser test then fails on it and a person decides


def test_tidy_drops_echoed_grades_only():
    nb = nbformat.v4.new_notebook()
    grade = nbformat.v4.new_output("execute_result", {"text/plain": "Grade(rung='Reproduced', reason='x')"})
    table = nbformat.v4.new_output("execute_result", {"text/plain": "   a  b\n0  1  2", "text/html": "<table/>"})
    nb.cells = [nbformat.v4.new_code_cell("g = run.record(...)\ng", outputs=[grade, table])]
    notebooks.tidy_outputs(nb)
    assert nb.cells[0].outputs == [table]


def test_tidy_merges_a_stream_written_in_a_row_and_nothing_across_a_table():
    out = lambda name, text: nbformat.v4.new_output("stream", name=name, text=text)
    table = nbformat.v4.new_output("display_data", {"text/plain": "   a\n0  1", "text/html": "<table/>"})
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("...", outputs=[
        out("stdout", "one\n"), out("stderr", "  \n"), out("stdout", "two\n"), out("stdout", "three\n"), table,
        out("stdout", "four\n"), out("stderr", "a warning\n"), out("stdout", "five\n")])]
    notebooks.tidy_outputs(nb)
    got = [(o.output_type, o.get("name"), o.get("text")) for o in nb.cells[0].outputs]
    assert got == [("stream", "stdout", "one\ntwo\nthree\n"), ("display_data", None, None),
                   ("stream", "stdout", "four\n"), ("stream", "stderr", "a warning\n"), ("stream", "stdout", "five\n")]


def test_intro_states_each_chapters_time_per_profile_as_claims_yaml_does():
    intro = (ROOT / "book" / "intro.md").read_text()
    for ch in CHAPTERS:
        row = next((ln for ln in intro.splitlines() if ln.startswith(f"| [{ch.id[:2]} · ")), None)
        assert row, f"book/intro.md: no row for chapter {ch.id} in the time-per-chapter table"
        cells = [c.strip() for c in row.strip("|").split("|")]
        m = ch.minutes
        want_full = f"~{m['full']:g} min" if m["full"] < 120 else f"~{m['full'] / 60:g} h"
        assert cells[2:5] == [f"~{m['smoke']:g} min", f"~{m['gpu']:g} min", want_full], \
            f"book/intro.md: {ch.id}'s times {cells[2:5]} disagree with claims.yaml's minutes {m}"
        cc = nbformat.read(ch.notebook, as_version=4).metadata["course"]["min_compute_capability"]
        assert cells[5] == f"compute capability {cc:.1f}", f"book/intro.md: {ch.id}'s minimum GPU {cells[5]!r}"


def test_the_course_address_is_the_one_in_config_everywhere():
    """Launch buttons use _config.yml's repository; the Colab cells are generated from it (above); prose too."""
    import re

    url, _ = notebooks.repository(ROOT)
    owner = url.split("github.com/")[1].split("/")[0]
    for f in [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]:
        for found in re.findall(rf"https://github\.com/{re.escape(owner)}/[\w.-]+", f.read_text()):
            assert found == url, f"{f.name}: {found} is not the course's address {url} (_config.yml)"


def test_tidy_drops_a_library_log_line_written_into_a_progress_bar():
    bar = ("ch06:  86%|████████▌ | 12/14 [06:15<02:00, 60.30s/part, hf_batch] 2026-12-04 14:35:29,525 - "
           "ContinuousBatchingLogger - WARNING - `eos_token_id` not set in GenerationConfig.\n"
           "ch06: 100%|██████████| 14/14 [08:18<00:00, 35.57s/part, dial]")
    assert notebooks.tidy_text(bar) == "ch06: 100%|██████████| 14/14 [08:18<00:00, 35.57s/part, dial]"
    kept = "step 3: 2026-12-04 14:35:29,525 - a line of the chapter's own that looks like a log"
    assert notebooks.tidy_text(kept) == kept  # only a bar with HF's logger in it goes


def test_tidy_drops_torch_log_lines_alone_or_after_a_bar():
    text = ("record 5 arch, seed 0:  57%|█████▋    | 729/1280 [00:18<00:09, 60.03it/s]W1204 21:35:57.272000 506 "
            "torch/_dynamo/convert_frame.py:1743] [0/8] torch._dynamo hit config.recompile_limit (8)\n"
            "W1204 21:35:57.272000 506 torch/_dynamo/convert_frame.py:1743] [0/8]    function: 'forward'\n"
            "record 5 arch, seed 0                        final 3.4655   23.4 s  data 7ffd3063d860")
    assert notebooks.tidy_text(text) == "record 5 arch, seed 0                        final 3.4655   23.4 s  data 7ffd3063d860"
    kept = "W1204 is a name of the chapter's own: 3 runs] final 3.4655"
    assert notebooks.tidy_text(kept) == kept  # no thread id and file:line] after the time: not torch's format


def test_the_running_note_names_the_gpus_a_chapter_runs_on():
    """A chapter whose gpu profile as set leaves out one of the course's GPUs says so in its running note
    (notebook metadata course.gpu_runs_on); the others keep the default."""
    meta = {"min_compute_capability": 8.0, "min_gpu_why": "bf16"}
    default = notebooks.running_note({"smoke": 1, "gpu": 5}, meta)
    assert "come from an H100 or H200 | ~5 min on an H100 or H200 |" in default
    only = notebooks.running_note({"smoke": 1, "gpu": 5}, {**meta, "gpu_runs_on": "an H200"})
    assert "come from an H200 | ~5 min on an H200 |" in only and "H100 or H200 |" not in only


def test_a_published_page_with_a_staged_version_beside_it_says_which_one_to_run():
    """Between a change and the chapter's next run, the published notebook is the record of its run and may no longer
    run against claims.yaml (chapter 01's §4 moved to chapter 08); its running note then names the staged notebook as
    the one to run, and says nothing of the kind once none is staged."""
    meta = {"min_compute_capability": 8.0, "min_gpu_why": "bf16"}
    plain = notebooks.running_note({"smoke": 1, "gpu": 5}, meta)
    staged = notebooks.running_note({"smoke": 1, "gpu": 5}, meta, "01_speedrun_muon.next.ipynb")
    assert "record of its committed run" not in plain and "next.ipynb" not in plain
    assert "`01_speedrun_muon.next.ipynb` beside this notebook, and that is the version to run yourself" in staged
    assert staged.startswith(plain[:-3]) and staged.endswith("\n:::")
    ch01 = next(c for c in CHAPTERS if c.id == "01_speedrun_muon")
    if ch01.next_notebook.is_file():  # the committed page says so while the staged version waits for its run
        assert "01_speedrun_muon.next.ipynb" in _nb(ch01).cells[1].source
