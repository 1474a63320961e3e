"""A restore writes its disk under a temporary name beside OUTPUT; discard_staged removes only such files."""

from __future__ import annotations

from pathlib import Path

from raksha.vault.sources.open import create_target, discard_staged


def test_only_the_staged_images_of_that_output_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "web1-vda.raw"
    target = create_target(str(out), "raw", 1 << 20)  # staged, as a restore killed before its commit leaves it
    target.pwrite(b"x" * 4096, 0)
    target.close()
    (staged,) = [p.name for p in tmp_path.iterdir()]
    assert staged.startswith("web1-vda.raw.") and staged.endswith(".raksha-partial")
    keep = ["web1-vda.raw", "web1-vda.raw.bak", "web1-vda.raw.zzzzzzzz.raksha-partial", "web1-vda.raw2.raksha-partial",
            "web1-vdb.raw.0123abcd.raksha-partial"]
    for name in keep:
        (tmp_path / name).write_text("not the staged image of this output\n")

    assert discard_staged(str(out)) == [staged]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert discard_staged(str(tmp_path / "gone" / "x.raw")) == []
