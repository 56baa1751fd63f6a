"""The mmsim command."""

import pytest

from mmsim.server.cli import main


@pytest.mark.violations_expected  # the no-recheck rows
def test_race_command_reports_and_passes_for_safe_protocols(capsys) -> None:
    assert main(["race", "--seeds", "20", "--protocol", "recheck", "--protocol", "no-recheck"]) == 0
    out = capsys.readouterr().out
    assert "recheck" in out and "no-recheck" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert rows["recheck"].split("│")[2].strip() == "0"  # no seed caught
    assert int(rows["no-recheck"].split("│")[2].strip()) > 0

