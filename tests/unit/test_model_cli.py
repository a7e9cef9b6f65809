"""`edgesplit generate` / `embed` with --local: JSON shapes, streaming, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.cli import main
from shared.model.pipeline import LocalPipeline
from shared.model.tiny import write_tiny_checkpoint


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # --threads changes the process-wide setting


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {arch: write_tiny_checkpoint(arch, root / arch, layers=4) for arch in ("gpt2", "bert")}


def test_generate_json_matches_streamed_text(folders: dict, capsys: pytest.CaptureFixture) -> None:
    common = [
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "9",
        "--local",
        "--model",
        str(folders["gpt2"]),
        "--threads",
        "1",
    ]
    assert main(["generate", *common, "--splits", "1,3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"token_ids", "text", "ttft_s", "tpot_s"}
    assert len(result["token_ids"]) == 9 and result["ttft_s"] > 0 and result["tpot_s"] > 0
    pipeline = LocalPipeline(folders["gpt2"])
    prompt_ids = pipeline.tokenizer.encode("The capital of France is")
    assert result["token_ids"] == list(pipeline.generate(prompt_ids, 9).token_ids)
    assert main(["generate", *common]) == 0
    assert capsys.readouterr().out == result["text"] + "\n"


def test_generate_from_ids_with_seeded_sampling(
    folders: dict, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "generate",
        "--prompt-ids",
        "5,6,7",
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.0",
        "--seed",
        "3",
        "--json",
        "--local",
        "--model",
        str(folders["gpt2"]),
    ]
    assert main(argv) == 0 and main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert json.loads(first)["token_ids"] == json.loads(second)["token_ids"]


def test_embed_json(folders: dict, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "embed",
                "--text",
                "hello world",
                "--json",
                "--local",
                "--model",
                str(folders["bert"]),
                "--splits",
                "2",
            ]
        )
        == 0
    )
    embedding = json.loads(capsys.readouterr().out)["embedding"]
    assert len(embedding) == 64 and abs(float(torch.tensor(embedding).norm()) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--prompt-ids", "1,x", "--local", "--model", "{gpt2}"], "--prompt-ids"),
        (
            ["generate", "--prompt", "hi", "--local", "--model", "{gpt2}", "--splits", "3,2"],
            "split 2",
        ),
        (
            ["generate", "--prompt", "hi", "--local", "--model", "{gpt2}", "--splits", "4"],
            "split 4",
        ),
        (
            ["generate", "--prompt", "hi", "--local", "--model", "/nonexistent/model"],
            "does not exist",
        ),
        (
            [
                "generate",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "999",
                "--local",
                "--model",
                "{gpt2}",
            ],
            "context",
        ),
        (["embed", "--text", "hi", "--local", "--model", "{gpt2}"], "decoder"),
        (["generate", "--prompt", "hi", "--local"], "--model"),
    ],
)
def test_bad_input_is_one_line_error(
    folders: dict, capsys: pytest.CaptureFixture, argv: list, message: str
) -> None:
    argv = [part.format(gpt2=folders["gpt2"]) for part in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "2"], "--top-p"),
    ],
)
def test_bad_sampling_for_a_broker_is_one_line_before_connecting(
    capsys: pytest.CaptureFixture, options: list, message: str
) -> None:
    """Checked before any connection: port 1 never answers, so a connect would be the error."""
    assert main(["generate", "hi", "--broker", "mqtt://127.0.0.1:1", *options]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert "broker" not in err
