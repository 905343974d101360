"""What older Triton, numpy and torch releases raise where a test runs the DSA kernels
under Triton's interpreter on the CPU: such a test skips there, naming why (the GPU tests
run the compiled kernels)."""

from __future__ import annotations

import pytest

# Triton 3.4's and 3.6's interpreter (and the device image's) under numpy 2.4, at
# `range(0, n, BN)` with `n` a launch argument: it hands the kernel scalars as 1-element
# arrays, which numpy 2.4 will not convert. Under numpy 1.26 Triton 3.4's ran the kernels;
# 3.7 (numpy 2.2) and 3.9 (numpy 2.4) run them
OLD_INTERPRETER = "only 0-dimensional arrays can be converted to Python scalars"

# torch 2.8 when a registered op wraps a kernel the interpreter defined (2.11 and 2.13
# take it)
OLD_WRAP_TRITON = "wrap_triton only works on functions annotated with triton.jit"


def skip_where_old(stderr: str) -> None:
    """Skip the calling test if its interpreted run's ``stderr`` shows an older release's
    limit rather than a wrong kernel."""
    import torch

    if OLD_WRAP_TRITON in stderr:
        pytest.skip(f"torch {torch.__version__}'s wrap_triton takes no interpreted kernel")
    if OLD_INTERPRETER in stderr:
        import triton

        pytest.skip(
            f"triton {triton.__version__}'s interpreter cannot loop to a bound given at "
            "launch under this numpy (Triton 3.9's can)"
        )
