"""Text <-> token ids with a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

``TextTokenizer`` switches padding and truncation off (all-MiniLM's tokenizer.json ships
with both on). ``StreamDecoder`` turns token ids into text one at a time, holding back
output while the tokens so far end in a partial UTF-8 sequence (byte-level BPE splits
characters across tokens), so the concatenated pieces equal ``decode(ids)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from shared.errors import CheckpointError

_REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


class TextTokenizer:
    """Encode and decode text for one model."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    @classmethod
    def from_file(cls, path: Path | str) -> TextTokenizer:
        """Load a tokenizer.json; raises CheckpointError if it is missing or invalid."""
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path}: not a usable tokenizer.json: {error}") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the model's special tokens, e.g. BERT's [CLS]/[SEP])."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (end of sequence, ...) are left out by default."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the newly printable text.

    Decodes a short window of recent ids twice (with and without the new id) and emits
    the difference, so decoders that depend on neighbours (leading spaces, WordPiece
    ``##``) and multi-token UTF-8 characters come out right.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context for the next decode
        self._read_offset = 0  # ids before this are already emitted as text

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while a character is partial)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (e.g. an incomplete final character)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip) if ids else ""
