"""The scenario stack's run folder: a fresh stack never inherits an earlier run's state."""

from __future__ import annotations

from pathlib import Path

from services.cli.scenarios.stack import clear_run_dir


def test_a_rerun_into_the_same_folder_starts_without_the_old_brokers_state(tmp_path: Path) -> None:
    run = tmp_path / "logs" / "static"
    (run / "broker").mkdir(parents=True)
    (run / "broker" / "mosquitto.db").write_bytes(b"retained plan of the last run")
    (run / "orchestrator.log").write_text("decision 1 of the last run\n")
    (run / "signing.key").write_text("k" * 32)
    clear_run_dir(run)
    assert not (run / "broker").exists() and not (run / "orchestrator.log").exists()
    assert (run / "signing.key").read_text() == "k" * 32  # the run folder's key stays
    clear_run_dir(tmp_path / "new")  # a folder that does not exist yet is made
    assert (tmp_path / "new").is_dir()
