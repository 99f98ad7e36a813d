"""The README's main job runs to the end and says where each request went."""

from __future__ import annotations

import pytest

from tpcontrol.cli.main import main


def test_demo_routes_every_step_as_expected(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--engine-only", "--requests", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 9
    assert "FAIL" not in out
    assert "hello from alice's laptop" in out
    assert "route alice:echo-http  1 connection(s)" in out
    assert "x-dev: bob -> bob" in out
    assert "hello from bob's laptop" in out


def test_demo_rejects_bad_request_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--requests", "0"])
    assert info.value.code == 2
    assert "--requests" in capsys.readouterr().err
