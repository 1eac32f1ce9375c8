"""tune_cpu_allocator: keeps freed memory in the process (glibc), and otherwise changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stnkit.training import allocator, tune_cpu_allocator


def test_the_users_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tune_cpu_allocator() is False


def test_not_linux_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert tune_cpu_allocator() is False


def test_a_c_library_without_mallopt_changes_nothing(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")

    def no_library(*args, **kwargs):
        raise OSError("no such library")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_library)
    assert tune_cpu_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_sets_both_thresholds_with_glibc():
    # In a child process, so that the test process keeps its own allocator settings.
    code = "from stnkit.training import tune_cpu_allocator; print(tune_cpu_allocator())"
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "True"


def test_the_stnkit_command_tunes_it_at_start_up(monkeypatch):
    from stnkit.cli import main as cli_main

    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli_main, "main", lambda argv=None: 0)
    with pytest.raises(SystemExit) as exit_info:
        cli_main.run()
    assert exit_info.value.code == 0 and calls == [1]
