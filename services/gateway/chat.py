"""The chat template: messages to the prompt text the model was trained on.

The checkpoint's ``tokenizer_config.json`` names it (``chat_template``, a Jinja template,
as Hugging Face's tokenizers render it) where it has one: SmolLM2's is ChatML with a
default system line. A checkpoint without one (the tiny test models, a bare llama
folder) gets plain ChatML. The template renders in a sandbox (it comes from a file on
disk, not from the request) and is rendered once per request: microseconds of string
work, not compute.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.errors import ConfigError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, for checkpoints that ship no template."""


class ChatTemplate:
    """``render(messages)`` -> the prompt text, ending with the assistant's turn opened."""

    def __init__(self, source: str, origin: str) -> None:
        self.origin = origin
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        try:
            self._template = environment.from_string(source)
        except TemplateError as error:
            raise ConfigError(f"chat template of {origin} does not compile: {error}") from None
        self._special: dict[str, str] = {}

    @classmethod
    def for_model(cls, model_dir: Path | None) -> ChatTemplate:
        """The template of ``model_dir``'s tokenizer_config.json, else ChatML.

        Raises ConfigError for an unreadable config or a template that does not compile.
        """
        config_file = model_dir / "tokenizer_config.json" if model_dir is not None else None
        if config_file is None or not config_file.is_file():
            return cls(CHATML, "ChatML (the checkpoint ships no chat template)")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read {config_file}: {error}") from None
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)  # fmt: skip
        if not isinstance(template, str):
            return cls(CHATML, "ChatML (the checkpoint ships no chat template)")
        template_obj = cls(template, str(config_file))
        template_obj._special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
        return template_obj

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for ``messages`` ((role, content) pairs). Raises ConfigError when
        the template refuses them (``raise_exception`` in the template)."""
        try:
            return self._template.render(messages=[{"role": role, "content": content} for role, content in messages],
                                         add_generation_prompt=True, **self._special)  # fmt: skip
        except TemplateError as error:
            raise ConfigError(f"the chat template refused the messages: {error}") from None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise(message: str) -> None:
    raise TemplateError(message)
