"""The committed notebooks as a reader meets them: presentation only, never a number.

``tidy`` is what ``publish_run`` applies to an executed gpu/full run before it replaces the committed
notebook (and what ``python -m repro_utils.notebooks`` applies to the committed notebooks in place):

- the title first; the setup cells hidden the same way in every chapter: the Colab cell removed from the
  book, the parameters cell folded (``hide-cell``), papermill's injected cell removed from the book, the
  cell that calls ``start(...)`` and the code cells right after it (imports, helpers) folded to what they
  print (``hide-input``: ``setup_cells``);
- papermill's injected cell kept as a commented record, so that "Run all" in Colab or Jupyter uses the
  parameters cell (``profile = "auto"``) and not the published run's ``profile = "gpu"``; the values stay
  in ``nb.metadata.papermill.parameters`` (what ``repro check`` reads), and papermill replaces the cell
  on every run;
- the Colab cell generated from one setting, ``_config.yml``'s ``repository`` (the launch buttons use it
  too), and the chapter's minimum GPU (``nb.metadata.course.min_compute_capability``): an older GPU (Colab's
  T4) is hidden, so that ``auto`` runs the smoke profile on the CPU instead of failing;
- the "Running this chapter" note near the top, generated from ``claims.yaml``'s minutes and the
  chapter's minimum GPU;
- consecutive outputs of one stream merged into one box (not across a table or figure between them);
- known debris removed from stream outputs (``KNOWN_DEBRIS``: warnings of dependencies, tqdm's
  ipywidgets notice, dataset-building logs, the GPU box's paths) and ``Grade(...)`` values that a cell
  echoed after ``run.record`` had already printed the grade.

Everything here is idempotent: tidying a tidy notebook changes nothing.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

# Strings that no output a reader sees should hold (the browser test fails on any of them).
KNOWN_DEBRIS = (
    "IProgress not found",  # tqdm.auto without ipywidgets (TqdmWarning)
    "SyntaxWarning",  # a dependency's source compiled at import (cellpylib's `is "recursive"`)
    "Attempting to run cuBLAS, but there was no current CUDA context",  # torch's first backward on a thread
    "Converting a tensor with requires_grad=True to a scalar",  # torch, from a cell's float(tensor)
    "Grade(rung=",  # run.record()'s return value, echoed by a cell
    "/root/out/",  # the GPU box's output folder
    "Generating train split",  # datasets building its cache
    "Generating val split",
    "hit config.recompile_limit",  # torch._dynamo's log line (the tidy removes torch's log lines: _TORCH_LOG)
)
_WARNING = re.compile(r"^\S+\.py:\d+: (?P<cat>\w+Warning): (?P<msg>.*)$")
_DEBRIS_LINE = re.compile(r"^Generating \w+ split: ")
# a torch log line (glog format: level, date, time, thread, file:line]), alone or written after a progress bar that
# it interrupted; torch._dynamo's recompile-limit warning was the first (chapter 01, H200 run at 6f8498c)
_TORCH_LOG = re.compile(r"^(?:[^\n]*\])?[WEI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
# a library's log line written into the middle of a progress bar (HF's generate_batch); the bar's line goes with it
_LOG_IN_BAR = re.compile(r"^[^\n]*\| [^\n]* \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ContinuousBatchingLogger - WARNING - [^\n]*$")
SETUP_TAGS = {"colab": "remove-cell", "parameters": "hide-cell", "injected-parameters": "remove-cell",
              "setup": "hide-input"}
COLAB_MARK = "# Colab only:"
INJECTED_MARK = "# Parameters of the published run"
RUNNING_NOTE = "running-note"  # nb cell metadata course.generated: the "Running this chapter" note


# ---- stream outputs -------------------------------------------------------------------------------------

def _is_debris_warning(line: str) -> bool:
    m = _WARNING.match(line)
    return bool(m) and (m["cat"] in ("TqdmWarning", "SyntaxWarning") or any(d in line for d in KNOWN_DEBRIS))


def tidy_text(text: str, *, ledger: str | None = None) -> str:
    """A stream's text without known debris. A Python warning goes with its continuation lines (up to the
    indented source line that ``warnings`` prints after it); ``ledger: PATH`` names where the ledger is
    committed; lines of spaces (cleared progress bars) become empty and runs of empty lines one."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if _is_debris_warning(line):
            j = i + 1
            while j < len(lines) and j <= i + 3 and not lines[j].startswith("  "):
                j += 1
            i = j + 1 if j < len(lines) and j <= i + 3 else i + 1
            continue
        if _DEBRIS_LINE.match(line) or _LOG_IN_BAR.match(line) or _TORCH_LOG.match(line):
            i += 1
            continue
        if ledger and line.startswith("ledger: "):
            line = f"ledger: {ledger}"
        out.append("" if not line.strip() else line)
        i += 1
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.lstrip("\n")


def tidy_outputs(nb, *, ledger: str | None = None) -> None:
    """Debris out of every code cell's outputs; a stream left empty goes, and so does a ``Grade(...)``
    value (its grade line is printed by ``run.record`` in the same cell); outputs of one stream that follow
    each other become one (nothing between them moves: a table between two prints keeps its place)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = tidy_text(out["text"], ledger=ledger)
                if not out["text"].strip():
                    continue
            elif out.get("output_type") == "execute_result":
                data = out.get("data", {})
                plain = data.get("text/plain", "")
                plain = "".join(plain) if isinstance(plain, list) else plain
                if set(data) == {"text/plain"} and plain.startswith("Grade(rung="):
                    continue
            if (kept and out.get("output_type") == "stream" and kept[-1].get("output_type") == "stream"
                    and kept[-1].get("name") == out.get("name")):
                kept[-1]["text"] += out["text"]  # one box for what one stream wrote in a row (the book shows each
                continue                         # output as its own box; a removed progress bar split them)
            kept.append(out)
        cell["outputs"] = kept


def debris(nb) -> list[str]:
    """Where a notebook's outputs still hold a known debris string: (cell index, string) descriptions."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items() if k.startswith("text/")]
            text = "".join("".join(t) if isinstance(t, list) else t for t in texts)
            found += [f"cell {i}: {d!r}" for d in KNOWN_DEBRIS if d in text]
    return found


# ---- setup cells --------------------------------------------------------------------------------------------

def repository(root: Path) -> tuple[str, str]:
    """(url, branch) from _config.yml: the one setting the launch buttons and the Colab cells follow."""
    repo = yaml.safe_load((Path(root) / "_config.yml").read_text())["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def colab_cell_source(url: str, branch: str, chapter: str, min_cc: float) -> str:
    return f'''{COLAB_MARK} fetch the course and install it (does nothing anywhere else).
import importlib.util, os, shutil, subprocess, sys  # noqa: E401
if importlib.util.find_spec("google") and importlib.util.find_spec("google.colab") and not importlib.util.find_spec("repro_utils"):
    subprocess.run(["git", "clone", "--depth", "1", "--branch", "{branch}", "{url}", "/content/course"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "/content/course/envs/colab.txt"], check=True)
    sys.path.insert(0, "/content/course/src")
    os.chdir("/content/course/chapters/{chapter}")
    # The gpu profile needs compute capability {min_cc:.1f} or newer. On an older GPU (Colab's T4 is 7.5) hide it
    # before torch starts, so that profile "auto" runs the smoke profile on the CPU instead of failing.
    smi = shutil.which("nvidia-smi")
    cc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                        text=True).stdout.split() if smi else []
    if cc and float(cc[0]) < {min_cc:.1f}:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        print(f"This GPU has compute capability {{cc[0]}}; the gpu profile needs {min_cc:.1f}: the smoke profile runs on the CPU.")'''


def _tags(cell) -> list[str]:
    return cell.setdefault("metadata", {}).setdefault("tags", [])


def _role(cell) -> str | None:
    tags = cell.get("metadata", {}).get("tags", [])
    if cell.cell_type == "code" and cell.source.startswith(COLAB_MARK):
        return "colab"
    for t in ("injected-parameters", "parameters"):
        if t in tags:
            return t
    return None


def _calls_start(source: str) -> bool:
    """Whether a cell's top-level code calls ``start(...)`` (repro_utils.start: the run begins there)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:  # an IPython magic, or not Python
        return False
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "start"
               for stmt in tree.body for n in ast.walk(stmt))


def setup_cells(nb) -> list[int]:
    """The chapter's setup: the code cell that calls ``start(...)`` and the code cells right after it, up to the
    first Markdown cell (imports, helpers, the run's clock). Hidden the same way in every chapter (``hide-input``:
    the source folds, what it prints, the chapter, profile and device, stays on the page)."""
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and _role(c) is None
                  and _calls_start(c.source)), None)
    if first is None:
        return []
    out = [first]
    while out[-1] + 1 < len(nb.cells) and nb.cells[out[-1] + 1].cell_type == "code":
        out.append(out[-1] + 1)
    return out


def comment_injected(source: str) -> str:
    if source.startswith(INJECTED_MARK):
        return source
    body = [ln for ln in source.strip().splitlines() if ln.strip() and ln.strip() != "# Parameters"]
    return (f"{INJECTED_MARK} (papermill injected them). A record only: commented out so that\n"
            "# \"Run all\" uses the parameters cell above; `repro run` and papermill replace this cell.\n"
            + "\n".join("# " + ln for ln in body))


def running_note(minutes: dict[str, float], meta: dict[str, Any], staged: str | None = None) -> str:
    """The "Running this chapter" note: time per profile (claims.yaml) and the minimum GPU. ``meta["gpu_runs_on"]``
    (optional) names the GPUs the gpu profile as set runs on, where fewer than the course's two do (chapter 06's
    ~100 GB peak leaves out the 80 GB H100). ``staged``: the name of the staged next version beside a published
    notebook, which is then the one to run (the published page is the record of its run, and its code may no longer
    run against the chapter's claims.yaml: chapter 01's §4 moved to chapter 08 before chapter 01 ran again)."""
    cc = meta["min_compute_capability"]
    m = {k: f"{v:g}" for k, v in minutes.items()}
    full = f"~{m['full']} min" if "full" in m else "—"
    gpus = meta.get("gpu_runs_on", "an H100 or H200")
    return f""":::{{admonition}} Running this chapter
:class: note

| profile | where | time |
|---|---|---|
| `smoke` | any CPU (CI, Colab's CPU runtime); correctness only, speed claims grade *Unverified* | ~{m['smoke']} min |
| `gpu` | one GPU; the outputs on this page come from {gpus} | ~{m['gpu']} min on {gpus} |
| `full` | the largest setting one machine holds; a claim is at its own scale only where its card says *own* | {full} |

**Minimum GPU for the `gpu` profile: compute capability {cc:.1f}** ({meta['min_gpu_why']}). Colab's free T4
(7.5) is older: there the chapter's first cell hides the GPU and `profile = "auto"` runs `smoke` on the
CPU. On any GPU but an H100 or H200 the grades stop at *Reproduced at reduced scale*. How to run: [](../../book/running.md).{_staged_line(staged)}
:::"""


def _staged_line(staged: str | None) -> str:
    if not staged:
        return ""
    return (f"\n\n**This page is the record of its committed run.** The chapter has changed since: its next run executes "
            f"`{staged}` beside this notebook, and that is the version to run yourself (`repro run` does; on Colab, "
            "open that file) until this page is republished.")


def tidy(nb, *, root: Path, chapter: str, minutes: dict[str, float], ledger: str | None = None,
         staged: str | None = None) -> None:
    """Everything in this module's docstring, in place. A chapter whose notebook does not declare its
    minimum GPU (``nb.metadata.course``; tests/test_book.py asks every chapter for it) keeps its Colab cell
    and gets no running note."""
    import nbformat

    tidy_outputs(nb, ledger=ledger)
    meta = nb.metadata.get("course", {})
    known = "min_compute_capability" in meta and "min_gpu_why" in meta
    url, branch = repository(root) if (Path(root) / "_config.yml").is_file() else (None, None)
    setup = set(setup_cells(nb))
    for i, cell in enumerate(nb.cells):
        role = _role(cell) or ("setup" if i in setup else None)
        if role is None:
            continue
        if role == "colab" and known and url:
            cell.source = colab_cell_source(url, branch, chapter, meta["min_compute_capability"])
        if role == "injected-parameters":
            cell.source = comment_injected(cell.source)
        tags = _tags(cell)
        if SETUP_TAGS[role] not in tags:
            tags.append(SETUP_TAGS[role])
    # the title first, then the running note
    title = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("# ")), None)
    if title is not None:
        nb.cells.insert(0, nb.cells.pop(title))
    if not known:
        return
    note = running_note(minutes, meta, staged)
    have = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("course", {}).get("generated") == RUNNING_NOTE]
    if have:
        nb.cells[have[0]].source = note
    else:
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(note, metadata={"course": {"generated": RUNNING_NOTE}}))


def tidy_committed(root: Path) -> list[Path]:
    """Apply ``tidy`` to every committed notebook in place; returns those that changed."""
    import nbformat

    from repro_utils.claims import chapters

    changed = []
    for ch in chapters(root):
        before = ch.notebook.read_text()
        nb = nbformat.read(ch.notebook, as_version=4)
        from repro_utils import ledger as ledger_

        shown = ledger_.latest(root, ch.id)  # the notebook shows the latest published run
        tidy(nb, root=root, chapter=ch.id, minutes=ch.minutes,
             ledger=str(shown[0].relative_to(root)) if shown else None,
             staged=ch.staged)
        nbformat.write(nb, ch.notebook)
        if ch.notebook.read_text() != before:
            changed.append(ch.notebook)
    return changed


if __name__ == "__main__":  # python -m repro_utils.notebooks [ROOT]
    from repro_utils.claims import find_root

    for p in tidy_committed(Path(sys.argv[1]) if len(sys.argv) > 1 else find_root()):
        print(f"tidied {p}")
