"""A float32 matrix product for the few rows of a decoding step, on CPUs with AVX-512 (`kernels/few_row_linear.cpp`).

A decoding step multiplies 2 to a few dozen rows (each caption or beam and its [MASK] probe) by every weight of the
text tower and the language-model head: the step is bound by reading those weights. `F.linear` hands such products
to MKL, which packs the weight anew at every call (and takes a slow path on AMD CPUs); oneDNN's prepacked product
streams the weight but at 4+ rows reads it at about half the memory bandwidth. This kernel streams a weight packed
once into panels of 32 output columns and keeps up to 6 rows in registers: on 2 cores of an AMD EPYC (Zen 4) it
replays the 0.49 GB of BERT-base decoding weights in 8 ms at 2 rows and 14 ms at 8 rows, against 71 and 45 ms with
`F.linear` and 11 and 17 ms with oneDNN prepacked (`docs/performance.md`).

Each output sums its inputs in chunks of 64 (one fused multiply-add chain each), so it differs from `F.linear` in the
last bits (with a smaller rounding error) and does not depend on the other rows of the product.

The kernel is compiled once per machine with torch's C++ extension loader (about 30 s on first use; needs a C++
compiler and ninja) and cached in `TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`). Set
`MICO_FEW_ROW_KERNEL=0` to go without it (oneDNN's prepacked products then serve); a failed build is logged and
does the same.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

SWITCH = "MICO_FEW_ROW_KERNEL"
SOURCE = Path(__file__).parent / "kernels" / "few_row_linear.cpp"
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]


def few_row_kernel_available() -> bool:
    """Whether the kernel serves here: not switched off (`MICO_FEW_ROW_KERNEL=0`), Linux on a CPU with AVX-512,
    and built (on the first call; see the module docstring)."""
    if os.environ.get(SWITCH, "1").strip() == "0":
        return False
    return _extension() is not None


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled kernel, or `None` where it cannot run or be built (or its source is absent, as in a checkpoint's
    copy of the model code for `trust_remote_code`)."""
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() != "AVX512" or not SOURCE.is_file():
        return None
    from torch.utils import cpp_extension

    logger.info(f"Building the few-row decoding kernel {SOURCE.name} (once per machine; {SWITCH}=0 skips it)")
    try:
        return cpp_extension.load(
            name="mico_few_row_linear", sources=[str(SOURCE)], extra_cflags=COMPILE_FLAGS, extra_ldflags=["-fopenmp"]
        )
    except (OSError, RuntimeError, ImportError) as error:
        logger.warning(f"The few-row decoding kernel did not build ({error}); decoding uses oneDNN's products instead")
        return None


def few_row_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`states -> F.linear(states, weight, bias)` (within rounding) with `weight` packed once, here, for the kernel;
    float32 on CPU, inference only (no gradient), and only where `few_row_kernel_available()`."""
    extension = _extension()
    if extension is None:
        raise RuntimeError("the few-row decoding kernel is not available here (see few_row_kernel_available)")
    packed = extension.pack(weight.detach())
    bias = None if bias is None else bias.detach().contiguous()
    out_features = weight.shape[0]
    return lambda states: extension.linear(states, packed, bias, out_features)
