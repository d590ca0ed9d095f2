"""Runs this directory's kernel tests in a fresh interpreter-mode process when they cannot run in this one.

That happens only when triton was imported (without ``TRITON_INTERPRET=1``) before this directory's
conftest, on a machine without a GPU; otherwise the tests ran in-process and this one skips.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import DEVICE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


@pytest.mark.skipif(DEVICE is not None, reason="kernel tests ran in this process")
def test_kernel_tests_in_an_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"kernel tests failed in the interpreter subprocess:\n{tail}"
    assert " passed" in proc.stdout, tail  # (in the child, this test itself skips)
