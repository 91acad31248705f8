"""``python -m service.bench``: its table, on a few methods so that it stays quick."""

from __future__ import annotations

import pytest

from service.bench import main


def test_the_table_has_a_row_per_method_and_skips_what_cannot_apply(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["--methods", "gradcam,eigencam,legrad", "--no-references", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "legrad: skipped" in out and "vision transformer" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    names = [row.split("|")[1].strip() for row in rows]
    assert "gradcam" in names and "eigencam" in names and "legrad" not in names
    gradcam = rows[names.index("gradcam")]
    assert all(cell.strip() for cell in gradcam.split("|")[1:-1])


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--methods", "nope", "--no-references"])
