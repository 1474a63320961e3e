"""The changed-extents file of `raksha vault backup --changed-extents`: read into arrays, judged as JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from raksha.cli.vault_cmd import _read_extents
from raksha.domain.errors import InvalidInput
from raksha.vault.sources.base import ExtentArray


@pytest.mark.parametrize("text, extents", [
    ("[[0, 4096], [8192, 512]]", [(0, 4096), (8192, 512)]),
    (" \n[ [0,1] ,\n\t[5 , 2] ]\n", [(0, 1), (5, 2)]),
    ("[]", []),
    ("[[3, 0], [3, 0]]", [(3, 0), (3, 0)]),  # as given: empty and repeated extents are the engine's to drop
])
def test_a_plain_list_of_pairs_is_read_into_arrays(tmp_path: Path, text: str, extents: list[tuple[int, int]]) -> None:
    path = tmp_path / "changed.json"
    path.write_text(text)
    got = _read_extents(str(path))
    assert isinstance(got, ExtentArray) and list(got) == extents


def test_valid_json_the_scanner_does_not_take_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "changed.json"
    path.write_text("[[18446744073709551616, 1]]")  # past 64 bits: JSON's business, not the arrays'
    assert list(_read_extents(str(path))) == [(1 << 64, 1)]


@pytest.mark.parametrize("text", ["[[0, -1]]", "[[0, 1.5]]", "[[0, 1], [2]]", "[[0, 1] [2, 3]]", "[[0, 1]] x",
                                  "[[0, [1, 2]]]", "{}", "[[01, 2]]", "", "[[0, 1],]", '[["0", 1]]'])
def test_anything_else_is_extents_invalid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "changed.json"
    path.write_text(text)
    with pytest.raises(InvalidInput) as err:
        _read_extents(str(path))
    assert err.value.code == "EXTENTS_INVALID"


def test_a_missing_file_is_extents_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read") as err:
        _read_extents(str(tmp_path / "absent.json"))
    assert err.value.code == "EXTENTS_INVALID"
