"""Command line: ``sawkv eval`` (more commands register on the same ``app``).

Imports of torch / transformers / fastapi stay inside the command functions, so ``sawkv --help``
is fast and works without the serving extras. To add a command, define a function decorated
with ``@app.command("name")`` below and import what it needs inside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="sawkv: a 4-bit KV cache (INT4 + block-diagonal Hadamard rotation) for LLM serving.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_METHODS = "bf16,int8,int4,int4-bdr64"
METHODS_HELP = (
    "comma-separated KV methods, e.g. auto,bf16,int4-bdr64-kc; append @prefill to a -kc method "
    "to center keys on the window's own prefill mean instead of the calibrated mean"
)


@app.callback()
def _root() -> None:
    """sawkv: a 4-bit KV cache (INT4 + block-diagonal Hadamard rotation) for LLM serving."""
    # A callback keeps ``eval`` a sub-command even while it is the only command.


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load_done(path: Path | None, header: dict) -> dict[str, dict]:
    """Results of an earlier run with the same settings (for ``--resume``), by label."""
    if path is None or not path.is_file():
        return {}
    old = json.loads(path.read_text())
    keys = ("model", "text", "tokens", "window", "dtype")
    if any(old.get(k) != header[k] for k in keys):
        return {}
    return {r["label"]: r for r in old.get("results", [])}


def _write_json(path: Path, header: dict, results: list[dict]) -> None:
    from sawkv.eval.table import add_comparisons

    add_comparisons(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**header, "results": results}, indent=1))
    tmp.replace(path)


@app.command("eval")
def eval_cmd(
    model: Annotated[
        str, typer.Option(help="model name (see MODELS.md) or HF directory")
    ] = "smollm2-135m",
    methods: Annotated[str, typer.Option(help=METHODS_HELP)] = DEFAULT_METHODS,
    text: Annotated[
        str, typer.Option(help="evaluation text: austen | paulgraham | wikipedia")
    ] = "austen",
    tokens: Annotated[int, typer.Option(help="evaluation tokens (windows x window length)")] = 8192,
    window: Annotated[int, typer.Option(help="window length in tokens")] = 1024,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write results JSON here")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG plot here")] = None,
    kc_mode: Annotated[
        str, typer.Option(help="key centering: static (calibrated) | prefill")
    ] = "static",
    dtype: Annotated[
        str, typer.Option(help="model dtype: float32 | bfloat16 | float16")
    ] = "float32",
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    resume: Annotated[
        bool, typer.Option(help="reuse results already in --json (same settings)")
    ] = False,
    calib_tokens: Annotated[
        int, typer.Option(help="tokens for key-mean calibration (first use)")
    ] = 4096,
) -> None:
    """Perplexity of each KV method on real text; prints a table, optionally JSON and a plot."""
    import torch

    from sawkv.eval.calibrate import get_key_means
    from sawkv.eval.data import token_windows
    from sawkv.eval.perplexity import compare_methods
    from sawkv.eval.table import plot_results, print_table
    from sawkv.models.hub import load_hf_model

    if kc_mode not in ("static", "prefill"):
        raise typer.BadParameter(f"--kc-mode must be static or prefill, got {kc_mode!r}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise typer.BadParameter(f"unknown --dtype {dtype!r}")
    labels = [m.strip() for m in methods.split(",") if m.strip()]
    if not labels:
        raise typer.BadParameter("--methods is empty")
    header = {
        "model": model,
        "text": text,
        "tokens": tokens,
        "window": window,
        "dtype": dtype,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "bos": False,
    }
    done = _load_done(json_path, header) if resume else {}
    lm, tokenizer = load_hf_model(model, torch_dtype, device)
    lm.eval()
    windows = torch.as_tensor(token_windows(tokenizer, text, tokens, window, split="eval"))

    def key_means():
        # Calibration windows do not follow --window: mu is a property of the model, cached once.
        calib_window = min(1024, calib_tokens)
        return get_key_means(lm, tokenizer, model, num_tokens=calib_tokens, window_len=calib_window)

    def save(results):
        if json_path is not None:
            _write_json(json_path, header, results)

    results = compare_methods(lm, windows, labels, key_means, kc_mode, done, save)
    save(results)
    title = f"{model} · {text} · {windows.shape[0]}×{windows.shape[1]} tokens · no BOS"
    print_table(results, title)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_results(results, str(plot), title)


def _register_serve() -> None:
    # The options module imports only typer; fastapi/uvicorn load when ``serve`` runs.
    from sawkv.server.cli import serve_cmd

    app.command("serve")(serve_cmd)


_register_serve()


def main() -> None:
    """Console-script entry point (``sawkv``)."""
    app(args=sys.argv[1:])


if __name__ == "__main__":
    main()
