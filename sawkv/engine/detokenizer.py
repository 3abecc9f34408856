"""Incremental detokenization for streaming, safe for multi-byte UTF-8 split over tokens.

Byte-level BPE tokenizers split one character (é, 你, 🙂) over several tokens; decoding a token
alone gives U+FFFD. We decode a short window of tokens twice, the already-emitted part
(``prefix_offset:read_offset``) and the window with the new tokens (``prefix_offset:``), and emit
the difference only once it no longer ends in U+FFFD. Decoding from a window (not token by token)
also keeps SentencePiece's leading-space rule right. Work per token is O(window), not O(length).

    tokens:  ... | prefix_offset ........ read_offset ........ len(ids)
                   [ emitted context     )[ not yet emitted    )
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
_NUM_CONTEXT_TOKENS = 5  # prompt tokens kept as context so the first output token decodes right


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    ``add(new_token_ids) -> str`` returns the text made complete by these tokens;
    ``flush() -> str`` returns whatever is still held back (an incomplete character at the end
    of generation is emitted as U+FFFD, as a full decode would). The concatenation of all
    deltas equals ``tokenizer.decode(output_token_ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _delta(self, *, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # the last character is still incomplete: wait for its other bytes
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        delta = new_text[len(prefix_text) :]
        self.text += delta
        return delta

    def add(self, new_token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_token_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        if self.tokenizer is None or self.read_offset == len(self.ids):
            return ""
        return self._delta(final=True)


class OutputTextStream:
    """The text a client sees: incremental detokenization plus stop-string hold-back.

    The engine ends a request on a stop string and drops it from the output; while streaming we
    therefore hold back the last ``max(len(stop)) - 1`` characters, which could be the start of a
    stop string, and at the end cut the text at the first stop string.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stop = list(stop)
        self.num_held = max((len(s) for s in self.stop), default=1) - 1
        self.num_sent = 0  # characters of the detokenized text already returned

    def update(self, new_token_ids: list[int], finished: bool) -> str:
        """Add this step's tokens; return the text delta that is safe to send now."""
        self.detokenizer.add(new_token_ids)
        if finished:
            self.detokenizer.flush()
        text = self.detokenizer.text
        end = min([text.find(s) for s in self.stop if s in text] + [len(text)])
        if not finished:
            end = min(end, len(text) - self.num_held)
        end = max(end, self.num_sent)
        delta = text[self.num_sent : end]
        self.num_sent = end
        return delta
