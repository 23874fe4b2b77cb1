"""Prepare ttnn's mock mode: the real library, no Tenstorrent hardware.

In mock mode tt-metal validates and dispatches every op exactly as on a device (shapes, shard specs,
circular-buffer and L1 budgets, allocations) but computes nothing: tensors read back as zeros. It
needs three things the ttnn wheel does not provide:

* a cluster descriptor naming the mocked machine. ttswap ships three Wormhole boards (:data:`BOARDS`):
  ``n150`` (one chip, the default), ``n300`` (two chips) and ``t3k`` (eight chips), chosen with
  ``TTSWAP_MOCK_BOARD`` or ``python -m ttswap.mock --board NAME``;
* a RISC-V "compiler", because tt-metal builds every kernel it dispatches. ttswap installs a
  stand-in (``data/mock_compiler.sh``) that links tiny stub ELFs with Debian's stock
  ``binutils-riscv64-unknown-elf``, unpacked into a project-local cache;
* a writable JIT cache directory.

The environment variables only have to be set before the process first opens a device or converts a
tensor to a block-float format; ``import ttnn`` reads neither. So the board is chosen once per process:
to use another one, start another process (the tests run each board in a subprocess).

The n300 and T3K descriptors are faithful: every chip has two Tensix rows harvested, as on shipping
n300 boards (UMD warns "Board n300 expects 2 units" otherwise). With dispatch on ethernet cores, which
is what tt-metal uses on these boards, a mock mesh reports an 8x8 grid, yet mock mode checks programs
against an 8x7 worker grid, and ttnn's own ``relu`` fails ("targets node (0,7), which is out of
bounds"). With dispatch on a worker row the mesh reports 8x7 and every op runs, but the dispatch row
has no cores left for a second command queue. So ttswap opens a mock multi-chip mesh with worker
dispatch and one command queue (:attr:`MockBoard.dispatch`, :attr:`MockBoard.max_command_queues`):
its grid is 8x7, smaller than a real n300's 8x8, which also exercises recipes on a smaller grid.

Run ``python -m ttswap.mock`` to prepare it and print the variables as shell ``export`` lines, or
call :func:`ensure_mock_mode` from Python. Both are idempotent; once everything is in place
:func:`ensure_mock_mode` takes a few milliseconds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class MockBoard:
    """A Wormhole board mock mode can stand in for."""

    name: str
    descriptor: Path  # UMD cluster descriptor (ttswap/data/)
    chips: int
    mesh_shape: tuple[int, int]  # the mesh tt-metal's demos open on this board (MESH_DEVICE=N150/N300/T3K)
    # how ttswap opens it in mock mode ("worker" or "ethernet" dispatch cores); see the module docstring
    dispatch: str = "worker"
    max_command_queues: int = 2


BOARDS = {
    "n150": MockBoard("n150", PACKAGE_DIR / "data" / "wormhole_n150_cluster.yaml", 1, (1, 1)),
    "n300": MockBoard("n300", PACKAGE_DIR / "data" / "wormhole_n300_cluster.yaml", 2, (1, 2), max_command_queues=1),
    "t3k": MockBoard("t3k", PACKAGE_DIR / "data" / "wormhole_t3k_cluster.yaml", 8, (1, 8), max_command_queues=1),
}
DEFAULT_BOARD = "n150"
BOARD_ENV = "TTSWAP_MOCK_BOARD"
CLUSTER_ENV = "TT_METAL_MOCK_CLUSTER_DESC_PATH"
CLUSTER_DESCRIPTOR = BOARDS[DEFAULT_BOARD].descriptor
COMPILER_TEMPLATE = PACKAGE_DIR / "data" / "mock_compiler.sh"
# <repo>/.ttswap/mock for a source checkout; a per-user cache for an installed wheel
DEFAULT_MOCK_DIR = (
    PACKAGE_DIR.parent / ".ttswap" / "mock"
    if (PACKAGE_DIR.parent / "pyproject.toml").exists()
    else Path.home() / ".cache" / "ttswap" / "mock"
)
MOCK_DIR_ENV = "TTSWAP_MOCK_DIR"

BINUTILS_PACKAGE = "binutils-riscv64-unknown-elf"
BINUTILS_PREFIX = "riscv64-unknown-elf-"
# where tt-metal looks for the SFPI compiler, relative to the ttnn package
COMPILER_PATH = Path("runtime", "sfpi", "compiler", "bin", "riscv-tt-elf-g++")

# The stub every kernel ELF is linked from. The %hi/%lo pair exists only to give the ELF a
# relocation section (linked with --emit-relocs), without which tt-metal's loader rejects it.
_STUB_BODY = """\
    .data
stub_word:
    .word 0
    .text
    .globl kernel_launch
kernel_launch:
    lui a0, %hi(stub_word)
    addi a0, a0, %lo(stub_word)
    ret
"""
# Kernels linked without a start-up object need an entry point in the section the linker
# script places first.
_STUB_START = """\
    .section .start, "ax"
    .globl _start
_start:
    ret
"""
STUB_SOURCES = {
    "kernel_stub.o": _STUB_BODY,
    "kernel_stub_with_start.o": _STUB_START + _STUB_BODY,
}


class MockSetupError(RuntimeError):
    """Mock mode cannot be prepared; the message says what is missing and how to provide it."""


def mock_dir() -> Path:
    """Where the binutils, stub objects and JIT cache live: ``$TTSWAP_MOCK_DIR``, else ``DEFAULT_MOCK_DIR``."""
    return Path(os.environ.get(MOCK_DIR_ENV) or DEFAULT_MOCK_DIR)


def ttnn_package_dir() -> Path:
    """The installed ttnn package, found without importing it."""
    spec = importlib.util.find_spec("ttnn")
    if spec is None or spec.origin is None:
        raise MockSetupError(
            f"ttnn is not installed for {sys.executable}; install it with `pip install 'ttswap[tt]'` (ttnn==0.81.1)"
        )
    return Path(spec.origin).parent


def sfpi_banner(ttnn_dir: Path) -> str:
    """The ``--version`` line of the SFPI compiler that built the wheel's pre-compiled firmware.

    tt-metal keys its firmware cache on this line: reporting it exactly makes tt-metal load the
    shipped firmware instead of building new (stub) firmware. The firmware ELFs record it in their
    ``.comment`` section as ``GCC: (tenstorrent/sfpi:<release>) <gcc version>``.
    """
    for elf in sorted((ttnn_dir / "tt_metal" / "pre-compiled").glob("*/brisc/brisc.elf")):
        found = re.search(rb"GCC: (\(tenstorrent/sfpi:[^)]+\) [0-9.]+)", elf.read_bytes())
        if found:
            return "riscv-tt-elf-g++ " + found.group(1).decode()
    raise MockSetupError(f"no pre-compiled firmware with an SFPI version stamp under {ttnn_dir / 'tt_metal'}")


def _run(command: list[str], cwd: Path, if_missing: str, stdin: str | None = None) -> None:
    if shutil.which(command[0]) is None:
        raise MockSetupError(f"{command[0]} not found: {if_missing}")
    result = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        hint = " (try `apt-get update` first)" if command[:2] == ["apt-get", "download"] else ""
        raise MockSetupError(f"{' '.join(command)} failed{hint}: {result.stderr.strip()[-500:]}")


def ensure_binutils(root: Path) -> Path:
    """The ``bin`` directory of the unpacked RISC-V binutils, downloading and unpacking them if needed."""
    bin_dir = root / "binutils" / "usr" / "bin"
    if all(os.access(bin_dir / f"{BINUTILS_PREFIX}{tool}", os.X_OK) for tool in ("as", "ld")):
        return bin_dir
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{BINUTILS_PACKAGE}_*.deb"))
    if not found:
        _run(
            ["apt-get", "download", BINUTILS_PACKAGE], debs,
            f"mock mode needs Debian's {BINUTILS_PACKAGE} package; put its .deb in {debs} by hand",
        )
        found = sorted(debs.glob(f"{BINUTILS_PACKAGE}_*.deb"))
        if not found:
            raise MockSetupError(f"apt-get download left no {BINUTILS_PACKAGE}_*.deb in {debs}")
    # unpack next to the target and rename, so an interrupted run never leaves a half tree behind
    unpacked = Path(tempfile.mkdtemp(prefix="binutils.", dir=root))
    try:
        _run(
            ["dpkg-deb", "-x", str(found[-1]), str(unpacked)], root,
            f"install dpkg, or unpack {found[-1].name} by hand so that {bin_dir} holds its tools",
        )
        shutil.rmtree(root / "binutils", ignore_errors=True)
        unpacked.rename(root / "binutils")
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
    return bin_dir


def ensure_stub_objects(root: Path, binutils_bin: Path) -> Path:
    """Assemble the stub objects once; every mock kernel link reuses them."""
    stubs = root / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    for name, source in STUB_SOURCES.items():
        target = stubs / name
        if target.exists():
            continue
        partial = stubs / f"{name}.partial"
        assemble = [str(binutils_bin / f"{BINUTILS_PREFIX}as"), "-march=rv32im", "-mabi=ilp32", "-o", str(partial)]
        _run(assemble, stubs, f"{BINUTILS_PACKAGE} in {binutils_bin} is incomplete", stdin=source)
        partial.rename(target)
    return stubs


def install_compiler(ttnn_dir: Path, binutils_bin: Path, stubs: Path) -> Path:
    """Put the stand-in compiler where tt-metal looks for SFPI; never over a real compiler."""
    text = COMPILER_TEMPLATE.read_text()
    fields = {"@BANNER@": sfpi_banner(ttnn_dir), "@BINUTILS_BIN@": str(binutils_bin), "@STUB_DIR@": str(stubs)}
    for field, value in fields.items():
        text = text.replace(field, shlex.quote(value))
    target = ttnn_dir / COMPILER_PATH
    if target.exists():
        current = target.read_bytes()
        if current == text.encode():
            return target
        if current.startswith(b"\x7fELF"):
            raise MockSetupError(f"{target} is a real SFPI compiler; mock mode will not replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text)
        partial.chmod(0o755)
        partial.replace(target)
    except OSError as error:
        raise MockSetupError(f"cannot install the mock compiler at {target}: {error}") from error
    return target


def board(name: str | None = None) -> MockBoard:
    """The board called ``name``; by default ``$TTSWAP_MOCK_BOARD``, else n150."""
    name = (name or os.environ.get(BOARD_ENV) or DEFAULT_BOARD).strip().lower()
    if name not in BOARDS:
        raise MockSetupError(f"unknown mock board {name!r} (from {BOARD_ENV} or --board); valid: {', '.join(BOARDS)}")
    return BOARDS[name]


def current_board() -> MockBoard | None:
    """The shipped board this process's mock mode uses (None when not in mock mode, or when
    ``TT_METAL_MOCK_CLUSTER_DESC_PATH`` names a descriptor of the user's own)."""
    path = os.environ.get(CLUSTER_ENV)
    if not path:
        return None
    for candidate in BOARDS.values():
        if Path(path).resolve() == candidate.descriptor.resolve():
            return candidate
    return None


def ensure_mock_mode(board_name: str | None = None) -> dict[str, str]:
    """Prepare mock mode for this interpreter's ttnn and set its environment variables, for
    ``board_name`` (default ``$TTSWAP_MOCK_BOARD``, else n150).

    Variables already set (by the user, or an earlier call) are kept; a board asked for explicitly that
    differs from the descriptor already in effect is an error, since ttnn reads it once per process.
    Returns the values in effect.
    """
    chosen = board(board_name)
    explicit = board_name or os.environ.get(BOARD_ENV)
    in_effect = os.environ.get(CLUSTER_ENV)
    if explicit and in_effect and Path(in_effect).resolve() != chosen.descriptor.resolve():
        raise MockSetupError(
            f"mock board {chosen.name!r} asked for, but {CLUSTER_ENV} already names {in_effect}; the board is "
            "chosen once per process: unset one of them, or run the other board in a new process"
        )
    root = mock_dir()
    root.mkdir(parents=True, exist_ok=True)
    ttnn_dir = ttnn_package_dir()
    binutils_bin = ensure_binutils(root)
    install_compiler(ttnn_dir, binutils_bin, ensure_stub_objects(root, binutils_bin))
    cache = root / "cache"
    cache.mkdir(exist_ok=True)
    if not in_effect:
        os.environ[BOARD_ENV] = chosen.name  # for child processes: the same board
    wanted = {
        CLUSTER_ENV: str(chosen.descriptor),
        # tt-metal appends its own directory names to this prefix, hence the trailing slash
        "TT_METAL_CACHE": f"{cache}/",
    }
    for name, value in wanted.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in (BOARD_ENV, *wanted) if name in os.environ}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ttswap.mock", description=__doc__.split("\n")[0])
    parser.add_argument("--board", choices=sorted(BOARDS), help=f"board to mock (default: ${BOARD_ENV}, else n150)")
    args = parser.parse_args(argv)
    try:
        variables = ensure_mock_mode(args.board)
    except MockSetupError as error:
        raise SystemExit(f"ttswap.mock: {error}") from error
    for name, value in variables.items():
        print(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
