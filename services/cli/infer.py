"""`edgesplit generate` and `edgesplit embed`.

``--local --model DIR [--splits 4,12]`` runs the model in this process, cut into the
same segments nodes would hold; without ``--local`` the request goes through the
running system with the client library (``services.cli.client``, loaded only then:
it needs the MQTT client, a local run does not). The library never imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import secrets
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from shared.config import BusSettings, load_settings
from shared.errors import ConfigError
from shared.process import first_edgesplit_error

if TYPE_CHECKING:  # torch and the model load only when a local run needs them
    from shared.model.pipeline import LocalPipeline

_DEFAULT_MAX_NEW_TOKENS = 32


def register(subparsers: Any) -> None:
    """Add the `generate` and `embed` sub-commands."""
    generate = subparsers.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text, greedily unless --temperature is given.",
    )
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("text", nargs="?", default=None, metavar="PROMPT",
                        help="prompt text (same as --prompt)")  # fmt: skip
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        default=_DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens to generate at most (default {_DEFAULT_MAX_NEW_TOKENS})",
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)"
    )
    generate.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    _add_common(generate)
    generate.set_defaults(handler=run_generate)

    embed = subparsers.add_parser(
        "embed",
        help="sentence embedding of a text (BERT models)",
        description="Mean-pooled, L2-normalised sentence embedding.",
    )
    text = embed.add_mutually_exclusive_group(required=True)
    text.add_argument("positional_text", nargs="?", default=None, metavar="TEXT",
                      help="text to embed (same as --text)")  # fmt: skip
    text.add_argument("--text", help="text to embed")
    _add_common(embed)
    embed.set_defaults(handler=run_embed)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--broker",
        default=None,
        help="broker URL (default $EDGESPLIT_BROKER_URL or mqtt://127.0.0.1:1883)",
    )
    parser.add_argument("--local", action="store_true", help="run in this process, no broker")
    parser.add_argument("--model", help="with --local: model folder (or a packaged model name)")
    parser.add_argument(
        "--splits", default="", help="with --local: block indices to cut at, e.g. 4,12"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--weights", choices=("fp32", "bf16", "int8", "int4"), default=None,
        help="with --local: quantise the linear weights at load (default: as stored)",
    )  # fmt: skip


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `generate`."""
    if args.text is not None:
        args.prompt = args.text
    if not args.local:
        return _generate_remote(args)
    from shared.model.sampling import SamplingParams

    pipeline = _local_pipeline(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    tokenizer = pipeline.tokenizer
    prompt_ids = (
        _parse_ids(args.prompt_ids, "--prompt-ids")
        if args.prompt_ids
        else tokenizer.encode(args.prompt)
    )
    stream = tokenizer.stream()

    def show(token_id: int) -> None:
        print(stream.push(token_id), end="", flush=True)

    result = pipeline.generate(
        prompt_ids, args.max_new_tokens, sampling, None if args.json else show
    )
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": list(result.token_ids),
                    "text": tokenizer.decode(result.token_ids),
                    "ttft_s": result.ttft_s,
                    "tpot_s": result.tpot_s,
                }
            )
        )
    else:
        print(stream.flush(), flush=True)
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """Handler of `embed`."""
    if args.positional_text is not None:
        args.text = args.positional_text
    if not args.local:
        return _embed_remote(args)
    pipeline = _local_pipeline(args)
    embedding = pipeline.embed(pipeline.tokenizer.encode(args.text))
    if args.json:
        print(json.dumps({"embedding": embedding}))
    else:
        print(" ".join(f"{value:.6f}" for value in embedding))
    return 0


def _client_library() -> ModuleType:
    """``services.cli.client`` (imported only when a request goes through the system)."""
    try:
        return importlib.import_module("services.cli.client")
    except ModuleNotFoundError as error:
        if error.name not in ("services.cli.client",):
            raise
        raise ConfigError(
            "the distributed client is not installed; use --local --model DIR"
        ) from None


def _local_pipeline(args: argparse.Namespace) -> LocalPipeline:
    import torch

    from shared.model.pipeline import LocalPipeline

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.model:
        raise ConfigError("--local needs --model DIR (a Hugging Face checkpoint folder)")
    splits = _parse_ids(args.splits, "--splits") if args.splits else []
    return LocalPipeline(_model_dir(args.model), splits, weights=args.weights)


def _model_dir(name_or_dir: str) -> Path:
    """A checkpoint folder, or a packaged model's name (prepared and cached on first use)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if "/" not in name_or_dir and not path.exists():
        from shared.model.prepare import PACKAGED_MODELS, prepare_model

        if name_or_dir in PACKAGED_MODELS:
            return prepare_model(name_or_dir, progress=lambda line: print(line, file=sys.stderr))
    raise ConfigError(f"model folder {name_or_dir} does not exist")


def _parse_ids(text: str, option: str) -> list[int]:
    """ "1,2,3" -> [1, 2, 3]; ConfigError naming the option for anything else."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from None
    if any(value < 0 for value in values):
        raise ConfigError(f"{option} must not be negative, got {text!r}")
    return values


# --- through the running system (the client library) -----------------------------


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run``; an EdgesplitError inside a task group comes out alone (one line)."""
    try:
        return asyncio.run(coroutine)
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None


def _options(library: ModuleType, args: argparse.Namespace) -> Any:
    """The library's ClientOptions from ``--broker`` (and ``cluster``/``timeout_s`` if set)."""
    settings = load_settings(
        BusSettings, {"broker_url": args.broker, "cluster": getattr(args, "cluster", None)}
    )
    return library.ClientOptions(settings, timeout_s=getattr(args, "timeout_s", None) or 120.0)


def _generate_remote(args: argparse.Namespace) -> int:
    """`edgesplit generate --broker URL ...`"""
    from shared.messages import GenerateRequest, RequestFinished, TokenGenerated

    token_ids = None
    if args.prompt_ids:
        token_ids = tuple(_parse_ids(args.prompt_ids, "--prompt-ids"))
    library = _client_library()
    options = _options(library, args)

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(
            request_id=secrets.token_hex(8),  # type: ignore[arg-type]
            reply_to=client,
            prompt=None if token_ids is not None else args.prompt,
            token_ids=token_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            timeout_s=options.timeout_s,
        )

    _checked(make)

    def show(token: TokenGenerated) -> None:
        print(token.text, end="", flush=True)

    result = _run(library.request(options, make, None if args.json else show))
    assert isinstance(result, RequestFinished)
    if args.json:
        print(json.dumps({"token_ids": list(result.token_ids), "text": result.text,
                          "ttft_s": result.ttft_s, "tpot_s": result.tpot_s}))  # fmt: skip
    else:
        print(flush=True)
        print(f"[{len(result.token_ids)} tokens, ttft {result.ttft_s * 1e3:.0f} ms, "
              f"tpot {result.tpot_s * 1e3:.1f} ms]", file=sys.stderr)  # fmt: skip
    return 0


_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
          "seed": "--seed", "prompt": "prompt", "token_ids": "--prompt-ids", "text": "--text",
          "timeout_s": "--timeout"}  # fmt: skip


def _checked(make: Callable[[str], Any]) -> None:
    """Build the request once before connecting, so a bad option is one line (ConfigError)."""
    try:
        make("check")
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{_FLAGS.get(field, field)}: {first['msg']}") from None


def _embed_remote(args: argparse.Namespace) -> int:
    """`edgesplit embed --broker URL --text ...`"""
    from shared.messages import EmbeddingReady, EmbedRequest

    library = _client_library()
    options = _options(library, args)

    def make(client: str) -> EmbedRequest:
        return EmbedRequest(request_id=secrets.token_hex(8), reply_to=client, text=args.text,  # type: ignore[arg-type]
                            timeout_s=options.timeout_s)  # fmt: skip

    _checked(make)
    result = _run(library.request(options, make))
    assert isinstance(result, EmbeddingReady)
    if args.json:
        print(json.dumps({"embedding": list(result.embedding)}))
    else:
        print(" ".join(f"{value:.6f}" for value in result.embedding))
    return 0
