"""Showing code in a notebook: the code a reader studies is the code that runs, defined once.

A chapter keeps its studied code in one module beside the notebook and shows it piece by piece:

    from repro_utils.display import show
    show(newton_schulz)            # the function's source, highlighted, in the rendered book
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
