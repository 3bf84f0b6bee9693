"""Showing code in a notebook: the code a reader studies is the code that runs, defined once.

A chapter keeps its studied code in one module beside the notebook and shows it piece by piece:

    from repro_utils.display import show
    show(newton_schulz)            # the function's source, highlighted, in the rendered book

and quotes the run's own numbers in its prose with ``glue`` (myst-nb's ``{glue:text}`` role reads them back).
"""

from __future__ import annotations

import inspect
import textwrap


def source(obj) -> str:
    return textwrap.dedent(inspect.getsource(obj)).rstrip()


def show(*objs, title: str | None = None) -> None:
    """Display the source of functions / classes / modules as highlighted Python."""
    code = "\n\n\n".join(source(o) for o in objs)
    markdown((f"**{title}**\n\n" if title else "") + f"```python\n{code}\n```")


def markdown(text: str) -> None:
    """Render Markdown in a notebook; print it anywhere else."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


def glue(name: str, value) -> None:
    """myst-nb's ``glue(name, value, display=False)``, written out so a chapter runs without myst-nb installed: the
    value's display data, stored in the cell's outputs under papermill's record prefix, for the prose to quote with
    the ``{glue:text}`` role. Numbers in prose then come from the run's own outputs, so a rerun never contradicts
    them. A string is stored as the text itself, not its repr in quotes (words for the prose)."""
    from IPython.core.formatters import format_display_data
    from IPython.display import display

    bundle, meta = format_display_data(value)
    if isinstance(value, str):
        bundle = {"text/plain": value}
    meta["scrapbook"] = {"name": name, "mime_prefix": "application/papermill.record/"}
    display({"application/papermill.record/" + k: v for k, v in bundle.items()}, raw=True, metadata=meta)
