"""Command line: ``sawkv eval``, ``generate``, ``serve``, ``bench`` (commands share one ``app``).

Imports of torch / transformers / fastapi stay inside the command functions, so ``sawkv --help``
is fast and works without the serving extras. To add a command, define a function decorated
with ``@app.command("name")`` below and import what it needs inside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

from sawkv.defaults import DEFAULT_KV_METHOD

app = typer.Typer(
    help="sawkv: a 4-bit KV cache (INT4 + block-diagonal Hadamard rotation) for LLM serving.",
    no_args_is_help=True,
    add_completion=False,
    # Without a terminal, rich renders help 80 columns wide and cuts long option names.
    context_settings={"max_content_width": 120},
)

DEFAULT_METHODS = "bf16,int8,int4,int4-bdr64,saw-int4"
METHODS_HELP = (
    "comma-separated KV methods, e.g. auto,bf16,int4-bdr64-kc; append @prefill to a -kc method "
    "to center keys on the window's own prefill mean instead of the calibrated mean, @sink4 to "
    "keep the first 4 tokens unquantized"
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


def _check_methods(methods: str, model: str) -> list[str]:
    """Method labels of ``--methods``, validated against the model's head_dim before any weights
    are loaded (a typo should fail in a second, not after minutes of model time)."""
    from transformers import AutoConfig

    from sawkv.eval.perplexity import parse_label
    from sawkv.hf.cache import attention_shape
    from sawkv.models.hub import resolve_model_dir
    from sawkv.quant.methods import parse_method

    labels = [m.strip() for m in methods.split(",") if m.strip()]
    if not labels:
        raise typer.BadParameter("--methods is empty")
    try:
        names = [parse_label(label)[0] for label in labels]
        for name in names:
            parse_method(name)
        head_dim = attention_shape(AutoConfig.from_pretrained(resolve_model_dir(model)))[2]
        for name in names:
            parse_method(name, head_dim)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return labels


@app.command("eval")
def eval_cmd(
    model: Annotated[
        str, typer.Option(help="registry name (smollm2-135m...) or HF directory")
    ] = "smollm2-135m",
    methods: Annotated[str, typer.Option(help=METHODS_HELP)] = DEFAULT_METHODS,
    text: Annotated[
        str,
        typer.Option(
            help="evaluation text: austen | paulgraham | wikipedia | owt, or a UTF-8 text file, "
            "or a JSONL file with a 'text' field per line"
        ),
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
    from sawkv.eval.data import load_text, token_windows
    from sawkv.eval.perplexity import compare_methods
    from sawkv.eval.table import plot_results, print_table
    from sawkv.models.hub import load_hf_model

    if kc_mode not in ("static", "prefill"):
        raise typer.BadParameter(f"--kc-mode must be static or prefill, got {kc_mode!r}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise typer.BadParameter(f"unknown --dtype {dtype!r}")
    labels = _check_methods(methods, model)
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
    try:  # a bad --text fails before minutes of model loading
        load_text(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--text") from None
    lm, tokenizer = load_hf_model(model, torch_dtype, device)
    lm.eval()
    try:
        windows = torch.as_tensor(token_windows(tokenizer, text, tokens, window, split="eval"))
    except ValueError as e:  # e.g. a short file: fewer windows than --tokens asks for
        raise typer.BadParameter(str(e), param_hint="--text/--tokens") from None

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


@app.command("report")
def report_cmd(
    models: Annotated[str, typer.Option(help="comma-separated model names or HF dirs")],
    methods: Annotated[str, typer.Option(help="comma-separated KV methods (baselines too)")] = "",
    tasks: Annotated[str, typer.Option(help="comma-separated tasks (ppl-<text>, mc, ...)")] = "",
    size: Annotated[
        str, typer.Option(help="tiny | cpu | small | medium (per-model CPU caps) | gpu")
    ] = "small",
    out: Annotated[Path, typer.Option(help="results directory")] = Path("benchmarks/results"),
    run: Annotated[bool, typer.Option(help="compute missing results (else only re-read)")] = True,
    device: Annotated[str, typer.Option(help="torch device for the model")] = "cpu",
    mc_items: Annotated[
        int | None,
        typer.Option(
            help="multiple-choice items per task, instead of the size's (results "
            "already in --out are kept: use a fresh --out)"
        ),
    ] = None,
) -> None:
    """Accuracy study: run missing (model, method, task) results, then write report.md + plots."""
    from dataclasses import replace

    from sawkv.eval.report import build_report
    from sawkv.eval.study import DEFAULT_METHODS as STUDY_METHODS
    from sawkv.eval.study import DEFAULT_TASKS, SIZES, run_study

    if size not in SIZES:
        raise typer.BadParameter(f"size must be one of {sorted(SIZES)}, got {size!r}")
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()] or list(STUDY_METHODS)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] or list(DEFAULT_TASKS)
    study_size = SIZES[size]
    if mc_items is not None:
        if mc_items <= 0:
            raise typer.BadParameter(f"--mc-items must be positive, got {mc_items}")
        study_size = replace(study_size, mc_items=mc_items)
    if run:
        run_study(model_list, method_list, task_list, out, study_size, device=device)
    print(build_report(out, model_list, method_list, task_list))


@app.command("profile")
def profile_cmd(
    model: Annotated[str, typer.Option(help="model name or HF dir")],
    method: Annotated[str, typer.Option(help="token-wise method applied to one head")] = (
        "int4-bdr-kc"
    ),
    tokens: Annotated[int, typer.Option(help="calibration tokens (one forward per head)")] = 256,
    plot: Annotated[Path | None, typer.Option(help="write the heatmap PNG here")] = None,
) -> None:
    """Sensitivity profile: KL to full precision with one (layer, KV head) quantized at a time."""
    from dataclasses import replace

    from sawkv.eval.artifacts import CalibConfig, prepare_method
    from sawkv.eval.calibrate import get_key_means
    from sawkv.eval.report import plot_sensitivity
    from sawkv.hf.cache import attention_shape
    from sawkv.models.hub import load_hf_model
    from sawkv.quant import parse_method
    from sawkv.quant.mixed import MixedMethod

    lm, tok = load_hf_model(model)
    low = parse_method(method, attention_shape(lm.config)[2])
    mixed = MixedMethod(avg_bits=low.bits + 0.5 if low.bits < 8 else 8, had_block=low.had_block,
                        rotate_v=low.rotate_v)  # fmt: skip
    if mixed.low_method.name != low.name:
        raise typer.BadParameter(f"profile needs an int{{2,4}}-bdr...-kc method, got {method}")
    cfg = replace(CalibConfig(), sens_tokens=tokens)
    fitted = prepare_method(mixed, lm, tok, model, get_key_means(lm, tok, model), cfg)
    sens = fitted.allocation  # the profile itself is cached in the model's cache directory
    print(f"allocation at {mixed.avg_bits:g} bits (layer x head):\n{sens}")
    if plot is not None and plot_sensitivity(model, plot):
        print(f"heatmap: {plot}")


@app.command("calibrate")
def calibrate_cmd(
    model: Annotated[str, typer.Option(help="model name (see MODELS.md) or HF directory")],
    budget: Annotated[
        float | None,
        typer.Option(help="bits per element incl. metadata (default: plain INT4 + 0.25)"),
    ] = None,
    texts: Annotated[
        str, typer.Option(help="calibration texts (their calibration split only)")
    ] = "austen,paulgraham,wikipedia,owt",
    tokens_per_text: Annotated[int, typer.Option(help="calibration tokens per text")] = 512,
    force: Annotated[bool, typer.Option(help="recalibrate even if a recipe is stored")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="also write the recipe as JSON here")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device for the model's forwards")] = "cpu",
    k_half: Annotated[
        bool, typer.Option(help="also try keys with per-half metadata (-kh) within the budget")
    ] = True,
) -> None:
    """Build the model's saw-int4 recipe (per-layer KV format under a bit budget) and store it."""
    from sawkv.eval.calibrate import get_recipe, recipe_path
    from sawkv.eval.calibrate_recipe import RecipeConfig
    from sawkv.eval.data import TEXT_NAMES
    from sawkv.models.hub import load_hf_model

    text_list = tuple(t.strip() for t in texts.split(",") if t.strip())
    bad = [t for t in text_list if t not in TEXT_NAMES]
    if bad or not text_list:
        raise typer.BadParameter(f"--texts: unknown {bad}; valid: {', '.join(TEXT_NAMES)}")
    try:
        cfg = RecipeConfig(texts=text_list, tokens_per_text=tokens_per_text, budget=budget,
                           k_half_meta=k_half)  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    path = recipe_path(model)
    if force and path.is_file():
        path.unlink()
    lm, tok = load_hf_model(model, device=device)
    try:
        recipe = get_recipe(lm, tok, model, cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _print_recipe(recipe, model, path)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"model": model, **recipe.to_json()}, indent=1))


def _print_recipe(recipe, model: str, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    info = recipe.info
    table = Table(title=f"saw-int4 recipe of {model}: {recipe.bits_per_element():.4f} bits/element "
                  f"(budget {recipe.budget:.4f})")  # fmt: skip
    table.add_column("layer", justify="right")
    table.add_column("format")
    table.add_column("key smoothing (max/min scale)")
    table.add_column("KL drop with INT8 (probed layers)", justify="right")
    drops = info.get("kl_drop_int8") or {}
    for i, m in enumerate(recipe.layers):
        drop = drops.get(str(i))
        s = recipe.layer_key_scale(i)
        smooth = "-" if s is None or bool((s == 1).all()) else f"{float(s.max() / s.min()):.1f}x"
        table.add_row(str(i), m.name, smooth, "-" if drop is None else f"{drop:.2e}")
    console = Console()
    console.print(table)
    console.print(f"attention sinks: {recipe.num_sink} exact first tokens per sequence")
    if "kl_all_int4" in info:
        kl4, kl = info["kl_all_int4"], info["kl_recipe"]
        console.print(f"KL to full precision (calibration windows): all-INT4 {kl4:.4f}, "
                      f"recipe {kl:.4f} nats/token")  # fmt: skip
    weighed = info.get("kl_k_half_vs_int8")
    if weighed:
        console.print(f"bits to -kh keys or INT8 layers: KL {weighed['k_half']:.4f} (-kh) vs "
                      f"{weighed['int8']:.4f} (INT8)")  # fmt: skip
    console.print(f"stored: {path}")


@app.command("generate")
def generate_cmd(
    prompts: Annotated[
        list[str], typer.Argument(help="prompts (text, or comma-separated ids with --token-ids)")
    ],
    model: Annotated[str, typer.Option(help="model name, HF dir or preset (qwen3-8b...)")] = (
        "smollm2-135m"
    ),
    kv_cache_dtype: Annotated[
        str, typer.Option(help="saw-int4 (calibrated), auto, bf16, fp16, int8, int4[-bdr{b}]...")
    ] = DEFAULT_KV_METHOD,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per prompt")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option()] = -1,
    seed: Annotated[int | None, typer.Option()] = None,
    max_model_len: Annotated[int, typer.Option()] = 2048,
    load_format: Annotated[str, typer.Option(help="auto or dummy (random weights)")] = "auto",
    token_ids: Annotated[bool, typer.Option(help="prompts are comma-separated token ids")] = False,
) -> None:
    """Generate through the serving engine and print the KV memory held against BF16."""
    from sawkv.engine.llm import LLM, SamplingParams
    from sawkv.engine.memory import kv_memory_report

    llm = LLM(model, kv_cache_dtype, max_model_len=max_model_len, load_format=load_format)
    inputs = [[int(t) for t in p.split(",")] for p in prompts] if token_ids else prompts
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            max_tokens=max_tokens)  # fmt: skip
    outs = llm.generate(inputs, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        shown = out.text if llm.tokenizer is not None else out.token_ids
        print(f"--- {prompt!r} -> ({out.finish_reason}) {shown!r}")
    num_tokens = sum(len(o.prompt_token_ids) + len(o.token_ids) for o in outs)
    print(kv_memory_report(llm.engine, num_tokens))


def _register_serve() -> None:
    # The options module imports only typer; fastapi/uvicorn load when ``serve`` runs.
    from sawkv.server.cli import serve_cmd

    app.command("serve")(serve_cmd)


_register_serve()


def _register_bench() -> None:
    # ``sawkv bench serve | throughput``; aiohttp and the engine load when a command runs.
    from sawkv.bench.cli import bench_app

    app.add_typer(bench_app, name="bench")


_register_bench()


def main() -> None:
    """Console-script entry point (``sawkv``).

    Known errors (a ValueError: bad method, unknown or uninstalled model, bad setting) print
    one line and exit 1; ``SAWKV_TRACEBACK=1`` shows the traceback instead.
    """
    _widen_help()
    try:
        app(args=sys.argv[1:])
    except ValueError as e:
        if os.environ.get("SAWKV_TRACEBACK"):
            raise
        print(f"sawkv: error: {e}", file=sys.stderr)
        sys.exit(1)


def _widen_help() -> None:
    """Rich sizes help tables to the terminal, or 80 columns without one (pipes, CI), which
    cuts option names such as ``--max-num-batched-tokens``; give it room when not a tty."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        os.environ["COLUMNS"] = "120"


if __name__ == "__main__":
    main()
