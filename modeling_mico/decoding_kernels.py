"""Float32 kernels for the decoding steps of captioning, on CPUs with AVX-512 (`kernels/decoding_kernels.cpp`).

A decoding step multiplies 2 to a few dozen rows (each caption or beam and its [MASK] probe) by every weight of the
text tower and the language-model head, and attends from those few rows to the multimodal context (1,028 tokens for 4
frames): it is bound by reading the weights and the context's keys/values. On CPU, `F.linear` hands such products to
MKL, which packs the weight anew at every call (and takes a slow path on AMD CPUs), oneDNN's prepacked product reads
the weight at about half the memory bandwidth at 4+ rows, and SDPA reads the context's keys/values at a fifth of it
for a few query rows. Two kernels stream them instead, and a third runs the whole step (measured in
`docs/performance.md`):

- `few_row_product`: a weight packed once into panels of 32 output columns, up to 6 rows kept in registers; each
  output sums its inputs in chunks of 64 (one fused multiply-add chain each), so it differs from `F.linear` in the
  last bits, with a smaller rounding error, and does not depend on the other rows of the product;
- `few_query_attention`: softmax(q k^T * scale) v per head, every key and value read once for all the query rows of
  the head; the exponentials are ATen's vectorized `exp_u20` (as SDPA's CPU kernel), so results agree with SDPA
  within rounding (relative 1e-6);
- `fused_decoding_step`: a whole decoding step of the text layers in one C++ call (the two kernels above, a masked
  self-attention over the preallocated cache, ATen's GELU and LayerNorms), without the Python and dispatch overhead
  of the layer modules, which took a quarter of a step.

They are compiled once per machine with torch's C++ extension loader (about 30 s on first use; needs a C++ compiler
and ninja) and cached in `TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`). Set
`MICO_DECODING_KERNELS=0` to go without them (oneDNN's prepacked products and SDPA then serve); a failed build is
logged and does the same.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

SWITCH = "MICO_DECODING_KERNELS"
SOURCE = Path(__file__).parent / "kernels" / "decoding_kernels.cpp"
COMPILE_FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512dq",
    "-mavx512bw",
    "-mavx512vl",
    "-mfma",
    "-fopenmp",
    "-DCPU_CAPABILITY=AVX512",
    "-DCPU_CAPABILITY_AVX512",
]
MAX_HEAD_DIM = 128  # `few_query_attention` keeps a head vector in eight 16-float registers


def decoding_kernels_available() -> bool:
    """Whether the kernels serve here: not switched off (`MICO_DECODING_KERNELS=0`), Linux on a CPU with AVX-512,
    and built (on the first call; see the module docstring)."""
    if os.environ.get(SWITCH, "1").strip() == "0":
        return False
    return _extension() is not None


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled kernels, or `None` where they cannot run or be built (or their source is absent, as in a
    checkpoint's copy of the model code for `trust_remote_code`)."""
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() != "AVX512" or not SOURCE.is_file():
        return None
    from torch.utils import cpp_extension

    logger.info(f"Building the decoding kernels {SOURCE.name} (once per machine; {SWITCH}=0 skips them)")
    try:
        return cpp_extension.load(
            name="mico_decoding_kernels", sources=[str(SOURCE)], extra_cflags=COMPILE_FLAGS, extra_ldflags=["-fopenmp"]
        )
    except (OSError, RuntimeError, ImportError) as error:
        logger.warning(f"The decoding kernels did not build ({error}); decoding uses oneDNN's products and SDPA")
        return None


def _built() -> ModuleType:
    extension = _extension()
    if extension is None:
        raise RuntimeError("the decoding kernels are not available here (see decoding_kernels_available)")
    return extension


@dataclasses.dataclass(frozen=True)
class PackedProduct:
    """`states -> F.linear(states, weight, bias)` (within rounding) by a weight packed once for `few_row_product`."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    out_features: int

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return _built().linear(states, self.packed, self.bias, self.out_features)


def few_row_product(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedProduct:
    """`states -> F.linear(states, weight, bias)` (within rounding) with `weight` packed once, here; float32 on CPU,
    inference only (no gradient), and only where `decoding_kernels_available()`."""
    packed = _built().pack(weight.detach())
    return PackedProduct(packed, None if bias is None else bias.detach().contiguous(), weight.shape[0])


def few_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention(query, key, value, scale=scale)` without a mask, within rounding, for float32
    `(batch, heads, rows, head_dim)` queries over `(batch, heads, length, head_dim)` keys/values (strided is fine if
    each head vector is contiguous, head_dim at most `MAX_HEAD_DIM`); inference only, and only where
    `decoding_kernels_available()`."""
    return _built().attention(query, key, value, scale)


def fused_decoding_step(
    weights: list[torch.Tensor], num_heads: int, layer_norm_eps: float
) -> Callable[..., torch.Tensor]:
    """The C++ decoding step of a whole stack of text layers (`DecodingStep` in the kernels' source): `weights` holds,
    per layer, the packed products (`PackedProduct.packed`), biases and LayerNorm parameters in the order that source
    names. Called as `step(hidden, mask, keys, values, context_keys, context_values)`."""
    return _built().DecodingStep(weights, num_heads, layer_norm_eps)
