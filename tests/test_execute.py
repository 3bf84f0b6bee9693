"""Publishing tidies stream outputs: a progress bar's refreshes render as its final state, nothing else changes."""

from __future__ import annotations

import nbformat

from repro_utils.execute import tidy_outputs


def test_progress_bar_refreshes_collapse_to_their_final_state():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="\rtrain:   0%|   | 0/3"),
        nbformat.v4.new_output("stream", name="stderr", text="\rtrain:  33%|#  | 1/3"),
        nbformat.v4.new_output("stream", name="stderr", text="\rtrain: 100%|###| 3/3\n"),
        nbformat.v4.new_output("stream", name="stdout", text="loss 3.21\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>"}),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
    ]
    nb.cells = [cell]
    assert tidy_outputs(nb) == 2
    outs = nb.cells[0].outputs
    assert [o.get("name", o["output_type"]) for o in outs] == ["stderr", "stdout", "display_data", "stdout"]
    assert outs[0]["text"] == "train: 100%|###| 3/3\n"
    assert outs[1]["text"] == "loss 3.21\n" and outs[3]["text"] == "done\n"
