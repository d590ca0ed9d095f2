"""Kernel tests: Triton's interpreter on CPU when there is no GPU, the real kernels on CUDA otherwise.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is first imported (Triton
decorates its own library functions at import). This conftest is loaded when pytest collects this
directory, before any test in it runs; it sets the variable when no GPU is present and nothing has
imported triton yet (the case for ``pytest tests/lowering/kernels`` and for the whole suite, since
collection imports no triton). The variable stays set for the rest of the process: on a CPU-only
machine nothing else uses Triton (Inductor's CPU backend generates C++).

If triton was imported earlier without it, kernels cannot run in this process: the in-process tests
skip and ``test_interpreter_subprocess.py`` reruns this directory in a fresh process with the
variable set.
"""

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
