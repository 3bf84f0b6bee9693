"""repro_utils.display.glue: the record myst-nb's {glue:text} role reads back from a cell's outputs."""

from __future__ import annotations

from repro_utils.display import glue


def test_glue_stores_a_number_as_its_repr_and_words_as_the_text_itself():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()  # display() publishes only inside a shell, as in a notebook's kernel
    with capture_output() as cap:
        glue("gain", 1.25)
        glue("verdict", "inside its sweep")
    (num, words) = cap.outputs
    prefix = "application/papermill.record/"
    assert num.data == {prefix + "text/plain": "1.25"}
    assert words.data == {prefix + "text/plain": "inside its sweep"}  # not "'inside its sweep'"
    for out, name in ((num, "gain"), (words, "verdict")):
        assert out.metadata["scrapbook"] == {"name": name, "mime_prefix": prefix}
