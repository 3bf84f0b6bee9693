"""claims.yaml: a malformed file fails with the file, the claim id and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from repro_utils.claims import ClaimsError, chapters, load_chapter, resolve_chapter

ROOT = Path(__file__).resolve().parents[1]
SELFTEST = Path(__file__).parent / "fixtures" / "00_selftest" / "claims.yaml"


def write_variant(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(SELFTEST.read_text())
    mutate(data)
    folder = tmp_path / "00_selftest"
    folder.mkdir(exist_ok=True)
    (folder / "claims.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def test_the_fixture_and_every_chapter_validate():
    assert load_chapter(SELFTEST).claim("uniform-mean").unit == ""
    for ch in chapters(ROOT):
        assert ch.claims and ch.notebook.name == f"{ch.id}.ipynb"


@pytest.mark.parametrize("mutate,needles", [
    (lambda d: d["claims"][0].pop("source"), ["'uniform-mean'", "source"]),
    (lambda d: d["claims"][1].update(holds_if={"at_leest": 1}), ["'needs-gpu'", "holds_if", "at_leest"]),
    (lambda d: d["claims"][0].update(profiles={"cloud": "own"}), ["'uniform-mean'", "profiles", "cloud"]),
    (lambda d: d["claims"][0].update(holds_if={"at_least": 1, "at_most": 2}), ["'uniform-mean'", "holds_if"]),
    (lambda d: d["claims"][0].update(claimed={"value": 0.5}), ["'uniform-mean'", "claimed", "setting"]),
    (lambda d: d["claims"][0]["source"].pop("paper"), ["'uniform-mean'", "source"]),
    (lambda d: d["claims"][1].update(id="uniform-mean"), ["'uniform-mean'", "declared twice"]),
    (lambda d: d.pop("minutes"), ["minutes"]),
    (lambda d: d["parameters"]["n"].update(default={"smoke": 10}), ["'n'", "below its minimum"]),
    (lambda d: d["parameters"]["method"].update(default="jax"), ["'method'", "not allowed"]),
])
def test_malformed_claims_name_file_claim_and_field(tmp_path, mutate, needles):
    folder = write_variant(tmp_path, mutate)
    with pytest.raises(ClaimsError) as e:
        load_chapter(folder)
    msg = str(e.value)
    assert str(folder / "claims.yaml") in msg
    for n in needles:
        assert n in msg, msg


def test_chapter_id_must_match_its_folder(tmp_path):
    folder = write_variant(tmp_path, lambda d: d.update(chapter="01_other"))
    with pytest.raises(ClaimsError, match="must equal its folder"):
        load_chapter(folder)


def test_not_yaml_is_a_clear_error(tmp_path):
    folder = tmp_path / "00_selftest"
    folder.mkdir()
    (folder / "claims.yaml").write_text("chapter: [unclosed\n")
    with pytest.raises(ClaimsError, match="not valid YAML"):
        load_chapter(folder)


def test_chapters_resolve_by_id_number_or_slug(course):
    for name in ("00_selftest", "00", "0", "selftest"):
        assert resolve_chapter(course, name).id == "00_selftest"
    with pytest.raises(KeyError, match="unknown chapter '7'.*00_selftest"):
        resolve_chapter(course, "7")
