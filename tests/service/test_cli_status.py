"""`edgesplit status` against a real broker with no system on it."""

from __future__ import annotations

import pytest

from services.cli import main
from shared.broker import LocalBroker


def test_status_with_no_system_says_so_in_one_line(
    broker: LocalBroker, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["status", "--broker", broker.url, "--cluster", cluster, "--wait-s", "0.3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "plan: none published" in out and "nodes (0):" in out
    assert err.count("\n") == 1 and "is `edgesplit up` running" in err and cluster in err
