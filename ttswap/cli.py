"""The ``ttswap`` command line (also ``python -m ttswap``).

    ttswap recipes
    ttswap convert ese_vovnet19b_dw --recipe ese_vovnet --input-shape 1,3,224,224 --report report.json
    ttswap convert resnet18 --recipe auto --input-shape 1,3,224,224 --save-recipe resnet18.toml
    ttswap convert ttswap.models.yolov4:YOLOv4 --recipe yolov4 --weights yolov4.weights --save yolov4.safetensors
    ttswap compare ttswap.models.yolov4:YOLOv4 --recipe yolov4 --json compare.json --plot pcc.png
    ttswap bench ese_vovnet19b_dw --recipe ese_vovnet
    ttswap cache info | prune | clear

MODEL is a timm model name or ``module:callable`` (a function or class building the model). Progress
goes to stderr. An error prints one line and exits with status 1 (argparse's usage errors: 2);
``--verbose`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ttswap.backends import BACKEND_NAMES

log = logging.getLogger("ttswap")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _progress_to_stderr(args.verbose, args.quiet):
            args.run(args)
    except KeyboardInterrupt:
        print("ttswap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line per error, unless asked for the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"ttswap: error: {exc}" + ("" if args.verbose else "  (--verbose for the traceback)"), file=sys.stderr)
        return 1
    return 0


# -- commands ----------------------------------------------------------------------------------------


def _recipes(args: argparse.Namespace) -> None:
    from ttswap.recipe import Recipe, shipped_recipes

    rows = [("recipe", "input shape", "description")]
    for name in shipped_recipes():
        recipe = Recipe.load(name)
        shape = "x".join(map(str, recipe.input_shape)) if recipe.input_shape else "-"
        rows.append((name, shape, recipe.description))
    _print_table(rows)


def _convert(args: argparse.Namespace) -> None:
    model, converted = _model_and_conversion(args)
    print(converted.report if args.table else converted.report.summary())
    if args.report:
        Path(args.report).write_text(converted.report.to_json())
        log.info("wrote the report to %s", args.report)
    if args.save:
        converted.save(args.save, model_ref=args.model, model_kwargs=args.model_kwargs)
        log.info("saved the converted model to %s (ttswap.load reads it)", args.save)
    if args.save_recipe:
        Path(args.save_recipe).write_text(converted.recipe.to_toml())
        log.info("wrote the recipe it used to %s (--recipe %s converts with it, no tuning)", args.save_recipe,
                 args.save_recipe)


def _compare(args: argparse.Namespace) -> None:
    from ttswap.compare import MODES, compare

    model, converted = _model_and_conversion(args)
    x = _example(converted.input_shape, args.seed)
    modes = MODES if args.mode == "both" else (args.mode,)
    log.info("comparing %d device layers with torch fp32 (%s)", len(converted.device_layers()), ", ".join(modes))
    result = compare(model, converted, x, modes=modes, threshold=args.threshold)
    print(result)
    if args.json:
        Path(args.json).write_text(result.to_json())
        log.info("wrote %s", args.json)
    if args.plot:
        result.plot(args.plot)
        log.info("wrote %s", args.plot)


def _bench(args: argparse.Namespace) -> None:
    model, converted = _model_and_conversion(args)
    x = _example(converted.input_shape, args.seed)
    with torch.no_grad():
        eager = _median_seconds(lambda: model(x), args.repeat)
        device = _median_seconds(lambda: converted(x), args.repeat)
    backend = converted.report.backend + (" (mock: computes nothing)" if getattr(converted.backend, "mock", False) else "")
    _print_table([
        ("model", "backend", "input", "convert s", "torch eager ms", "converted ms", "converted / eager"),
        (type(model).__name__, backend, "x".join(map(str, converted.input_shape)), f"{converted.report.seconds:.2f}",
         f"{eager * 1e3:.1f}", f"{device * 1e3:.1f}", f"{device / eager:.2f}"),
    ])


def _cache(args: argparse.Namespace) -> None:
    from ttswap.cache import about
    from ttswap.cache_store import cache_dir, entries, max_bytes, prune

    directory = cache_dir(args.cache_dir or True)
    limit = max_bytes(args.max_bytes)
    if args.action == "info":
        found = entries(directory)
        total = sum(e.size for e in found)
        print(f"{directory}: {len(found)} entries, {_size_text(total)} of a {_size_text(limit)} cap")
        if found:
            rows = [("last used", "size", "model", "recipe", "backend", "input", "key")]
            for entry in reversed(found):  # most recently used first
                info = about(entry.path)
                last_used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
                rows.append((last_used, _size_text(entry.size), info.get("model", info.get("error", "?")),
                             info.get("recipe", "?"), info.get("backend", "?"), info.get("input_shape", "?"),
                             entry.key[:12]))
            _print_table(rows)
        return
    result = prune(directory, 0 if args.action == "clear" else limit)
    print(f"{directory}: removed {len(result.removed)} entries ({_size_text(result.freed)})"
          + (f" and {result.temporary_files} unfinished write(s)" if result.temporary_files else "")
          + (f"; kept {len(result.in_use)} in use by a running conversion" if result.in_use else "")
          + f"; {_size_text(sum(e.size for e in entries(directory)))} left")


def _size_text(size: int) -> str:
    return f"{size / 1e3:.0f} kB" if size < 1e6 else f"{size / 1e6:.1f} MB"


# -- shared steps ------------------------------------------------------------------------------------


def _model_and_conversion(args: argparse.Namespace):
    from ttswap.converter import convert
    from ttswap.recipe import Recipe
    from ttswap.serialize import build_model

    recipe = Recipe.load(args.recipe)  # a bad recipe fails before a slow model build
    log.info("building %s", args.model)
    torch.manual_seed(args.seed)  # weights not loaded from a file are the same on every run
    model = build_model(args.model, args.model_kwargs, pretrained=args.pretrained)
    if args.weights:
        _load_weights(model, Path(args.weights))
    cache = False if args.no_cache else (args.cache_dir or True)
    converted = convert(model, recipe, input_shape=args.input_shape, backend=args.backend, cache=cache,
                        cache_max_bytes=args.cache_max_bytes, strict=args.strict)
    return model, converted


def _load_weights(model: nn.Module, path: Path) -> None:
    from ttswap.weights import load_darknet, load_state_dict_strict, read_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".weights":
        load_darknet(model, None, path)
    else:
        load_state_dict_strict(model, read_state_dict(path))
    log.info("loaded weights from %s", path)


def _example(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def _median_seconds(run: Callable[[], object], repeat: int) -> float:
    run()  # warm-up: first calls pay one-time costs (allocations, ttnn's program cache)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


@contextlib.contextmanager
def _progress_to_stderr(verbose: bool, quiet: bool) -> Iterator[None]:
    """ttswap's log lines on stderr while a command runs; the logger is restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ttswap: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False  # printed once, here, even when the root logger has handlers
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


# -- arguments ---------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (four positive integers), got {text!r}")
    return shape


def _size(text: str) -> int:
    from ttswap.cache_store import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_classes\": 20}}', got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttswap", description="Convert PyTorch CNNs to Tenstorrent TT-NN.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recipes = commands.add_parser("recipes", parents=[common], help="list the shipped recipes")
    recipes.set_defaults(run=_recipes)

    model = argparse.ArgumentParser(add_help=False, parents=[common])
    model.add_argument("model", metavar="MODEL", help="a timm model name, or module:callable building the model")
    model.add_argument("--model-kwargs", type=_kwargs, default={}, metavar="JSON",
                       help="keyword arguments for MODEL, as a JSON object")
    model.add_argument("--recipe", required=True, help="a shipped recipe's name or a .toml file")
    model.add_argument("--input-shape", type=_shape, metavar="N,C,H,W", help="default: the recipe's")
    model.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    model.add_argument("--weights", metavar="FILE", help=".pth/.pt/.safetensors state dict, or Darknet .weights")
    model.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads them)")
    model.add_argument("--strict", action="store_true", help="fail if any node would stay in torch")
    model.add_argument("--seed", type=int, default=0, help="seed of random weights and inputs (default 0)")
    model.add_argument("--cache-dir", metavar="DIR", help="weight cache directory (default: $TTSWAP_CACHE_DIR "
                                                          "or ~/.cache/ttswap/weights)")
    model.add_argument("--no-cache", action="store_true", help="do not read or write the weight cache")
    model.add_argument("--cache-max-bytes", metavar="SIZE", type=_size,
                       help="cap of the weight cache, e.g. 500M or 2G (default: $TTSWAP_CACHE_MAX_BYTES, else 2G)")

    convert = commands.add_parser("convert", parents=[model], help="convert a model and print its report")
    convert.add_argument("--report", metavar="FILE", help="write the conversion report as JSON")
    convert.add_argument("--table", action="store_true", help="print the whole per-node table, not the summary")
    convert.add_argument("--save", metavar="FILE", help="save the conversion (ttswap.load reads it)")
    convert.add_argument("--save-recipe", metavar="FILE.toml",
                         help="write the recipe the conversion used as a recipe file (with --recipe auto: the tuned one)")
    convert.set_defaults(run=_convert)

    compare = commands.add_parser("compare", parents=[model], help="per-layer PCC and error against torch fp32")
    compare.add_argument("--mode", choices=("both", "propagated", "isolated"), default="both")
    compare.add_argument("--threshold", type=float, default=0.99, help="flag layers below this PCC (default 0.99)")
    compare.add_argument("--json", metavar="FILE", help="write the comparison as JSON")
    compare.add_argument("--plot", metavar="FILE", help="write a PNG of PCC by layer (needs matplotlib)")
    compare.set_defaults(run=_compare)

    bench = commands.add_parser("bench", parents=[model], help="conversion time and forward time against torch eager")
    bench.add_argument("--repeat", type=int, default=3, help="timed forwards per model, after one warm-up")
    bench.set_defaults(run=_bench)

    cache = commands.add_parser("cache", parents=[common], help="show or empty the weight cache")
    cache.add_argument("action", choices=("info", "prune", "clear"),
                       help="info: entries, sizes, last use, model and recipe; prune: delete least recently used "
                            "entries beyond the cap; clear: delete every entry (entries in use are kept)")
    cache.add_argument("--cache-dir", metavar="DIR", help="default: $TTSWAP_CACHE_DIR or ~/.cache/ttswap/weights")
    cache.add_argument("--max-bytes", metavar="SIZE", type=_size,
                       help="the cap for prune, e.g. 500M or 2G (default: $TTSWAP_CACHE_MAX_BYTES, else 2G)")
    cache.set_defaults(run=_cache)
    return parser


__all__ = ["main"]
