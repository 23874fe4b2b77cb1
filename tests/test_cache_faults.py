"""The weight cache under faults, each in real processes: two conversions writing the same entry at once,
a writer killed mid-write, a full disk, a read-only directory. (A damaged entry: tests/test_cache.py.)
Every conversion must succeed with the same output as without the cache, and say at most one thing."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import ttswap
from cache_child import SOURCE_DIGEST, convert
from ttswap import cache as cache_module
from ttswap import cache_store
from ttswap.cache import CacheWarning

CHILD = Path(__file__).with_name("cache_child.py")


def start(mode: str, cache: Path, *args: str, **popen) -> subprocess.Popen:
    here = str(Path(ttswap.__file__).parents[1])  # the child converts with the ttswap under test
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning",
           "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, str(CHILD), mode, str(cache), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def files(directory: Path) -> tuple[list[str], list[str]]:
    """(entries, everything else) in the cache directory."""
    names = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    return [n for n in names if n.endswith(".safetensors") and not n.startswith(".")], \
        [n for n in names if not (n.endswith(".safetensors") and not n.startswith("."))]


def assert_hits_silently(directory: Path, expected: float, caplog) -> None:
    """The entry is whole: an in-process conversion reads it without a warning and gets ``expected``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        with caplog.at_level("INFO", logger="ttswap"):
            assert convert(0, directory) == pytest.approx(expected, rel=1e-6)
    assert any(m.startswith("weight cache: hit") for m in caplog.messages)


@pytest.fixture(autouse=True)
def _same_keys_as_the_children(monkeypatch):
    monkeypatch.setattr(cache_module, "_source_digest", lambda: SOURCE_DIGEST)


@pytest.fixture(scope="module")
def uncached() -> float:
    return convert(0, False)


def test_two_processes_converting_the_same_model_at_once_leave_one_valid_entry(tmp_path, uncached, caplog):
    cache = tmp_path / "cache"
    racers = [start("race", cache) for _ in range(2)]
    outcomes = [result(p) for p in racers]
    for outcome in outcomes:
        assert outcome["warnings"] == []
        assert outcome["sums"] == [pytest.approx(uncached, rel=1e-6)]
        assert any(line.startswith("weight cache: wrote") for line in outcome["log"])  # both missed, both wrote
    entries, others = files(cache)
    assert len(entries) == 1 and others == []
    assert_hits_silently(cache, uncached, caplog)


def test_a_writer_killed_mid_write_leaves_nothing_the_next_conversion_trips_on(tmp_path, uncached, caplog):
    cache = tmp_path / "cache"
    writer = start("killed", cache)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=60)
    entries, others = files(cache)
    assert entries == [] and len(others) == 1 and others[0].endswith(".tmp")  # half a temporary file, no entry

    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert convert(0, cache) == pytest.approx(uncached, rel=1e-6)
    assert len(files(cache)[0]) == 1
    assert_hits_silently(cache, uncached, caplog)

    temp = cache / others[0]
    os.utime(temp, (time.time() - 60,) * 2)  # a dead writer's file, older than any live write's
    pruned = cache_store.prune(cache, cache_store.DEFAULT_MAX_BYTES)
    assert pruned.temporary_files == 1 and pruned.removed == [] and not temp.exists()


def test_a_full_disk_converts_without_caching_and_says_why_once(tmp_path, uncached):
    cache = tmp_path / "cache"
    outcome = result(start("full-disk", cache))
    assert outcome["sums"] == [pytest.approx(uncached, rel=1e-6)]
    (warning,) = outcome["warnings"]
    assert warning.startswith("CacheWarning: weight cache: could not write")
    assert "File too large" in warning and "converted without caching" in warning
    assert files(cache) == ([], [])  # nothing half-written left behind


def _without_root_override() -> None:
    """Root ignores permission bits: drop the capabilities that let it (from the bounding set, so that
    they are gone after exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 3):  # CAP_DAC_OVERRIDE, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_directory_still_serves_hits_and_misses_convert_without_caching(tmp_path, uncached):
    cache = tmp_path / "cache"
    convert(0, cache)  # an entry for seed 0; seed 1 has none
    (entry,) = files(cache)[0]
    cache.chmod(0o555)
    try:
        popen = {"preexec_fn": _without_root_override} if os.geteuid() == 0 else {}
        try:
            child = start("read-only", cache, **popen)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"running as root without CAP_SETPCAP: cannot make a directory read-only ({exc})")
        outcome = result(child)
    finally:
        cache.chmod(0o755)
    assert outcome["sums"][0] == pytest.approx(uncached, rel=1e-6)
    assert any(line.startswith("weight cache: hit") for line in outcome["log"])
    (warning,) = outcome["warnings"]  # only the miss, once
    assert warning.startswith("CacheWarning: weight cache: could not write")
    assert "Permission denied" in warning and "converted without caching" in warning
    assert files(cache) == ([entry], [])
