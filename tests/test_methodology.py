"""The methodology page's worked examples are what the code prints: each python block that computes a
grade is executed, and its output must equal the text block that follows it on the page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from repro_utils.claims import Claim, Goal
from repro_utils.grading import Measurement, grade, grade_goal

PAGE = Path(__file__).resolve().parents[1] / "book" / "methodology.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)\n```", re.S)


def examples():
    blocks = BLOCK.findall(PAGE.read_text())
    claim = Claim.from_dict(yaml.safe_load(next(b for kind, b in blocks if kind == "yaml"))[0])
    pairs = [(code, out) for (k1, code), (k2, out) in zip(blocks, blocks[1:])
             if k1 == "python" and k2 == "text" and "g = grade" in code]
    return claim, pairs


def test_the_page_has_an_example_of_every_outcome():
    _, pairs = examples()
    firsts = {out.splitlines()[0] for _, out in pairs}
    assert {"Reproduced", "Reproduced at reduced scale", "Partially reproduced (reduced scale)",
            "Not reproduced (reduced scale)", "Unverified", "Met"} <= firsts
    assert len(pairs) >= 10


@pytest.mark.parametrize("i", range(len(examples()[1])))
def test_each_example_prints_what_the_page_says(i):
    claim, pairs = examples()
    code, out = pairs[i]
    env = {"claim": claim, "Claim": Claim, "Goal": Goal, "Measurement": Measurement, "grade": grade,
           "grade_goal": grade_goal}
    exec(code, env)
    g = env["g"]
    assert f"{g.label}\n{g.reason}" == out
