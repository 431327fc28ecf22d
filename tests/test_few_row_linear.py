"""The few-row decoding kernel (`modeling_mico.few_row_linear`): its products against float64, its independence of
the other rows, its errors, the switch that turns it off and its use by `generate`."""

import sys

import pytest
import torch
from test_generation import knowledge_inputs, tiny_config
from test_performance import recorded_products, unfused_linears
from torch.nn import functional as F

from modeling_mico import MiCoForConditionalGeneration, few_row_linear, modeling_mico_text
from modeling_mico.few_row_linear import few_row_kernel_available, few_row_product


pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="the few-row kernel runs on Linux CPUs with AVX-512 only",
)


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_kernel_builds_on_an_avx512_cpu():
    assert few_row_kernel_available()


@pytest.mark.parametrize("out_features", [1, 31, 32, 70, 1000])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 24])
def test_products_match_float64_as_closely_as_f_linear(out_features, rows):
    """Every column tail (a panel of 32 cut short) and every row count (blocks of 6 and their remainders): within
    twice F.linear's own error against the float64 product, or 4 units in the last place of the largest output (at
    one column, one rounding decides; chunked sums are usually closer)."""
    weight, bias, states = random(out_features, 200, seed=0), random(out_features, seed=1), random(rows, 200, seed=2)
    reference = F.linear(states.double(), weight.double(), bias.double())
    product = few_row_product(weight, bias)(states)
    assert product.shape == (rows, out_features) and product.dtype == torch.float32
    f_linear_error = (F.linear(states, weight, bias).double() - reference).abs().max().item()
    last_place = torch.finfo(torch.float32).eps * reference.abs().max().item()
    assert (product.double() - reference).abs().max().item() <= max(2 * f_linear_error, 4 * last_place)


def test_rows_do_not_change_each_other():
    """A row's result is the same bits alone or among others, for 3-D, non-contiguous and bias-free inputs."""
    weight = random(96, 64, seed=3)
    states = random(4, 9, 128, seed=4)[..., ::2]  # (4, 9, 64), every other feature: not contiguous
    product = few_row_product(weight, None)
    together = product(states)
    assert together.shape == (4, 9, 96)
    alone = torch.stack([torch.stack([product(row) for row in item]) for item in states])
    assert torch.equal(together, alone)
    torch.testing.assert_close(together, F.linear(states, weight), rtol=1e-5, atol=1e-5)


def test_mismatched_inputs_are_refused():
    product = few_row_product(random(40, 8, seed=5), random(40, seed=6))
    with pytest.raises(RuntimeError, match="linear: input has 5 features, the weight 8"):
        product(torch.ones(2, 5))
    with pytest.raises(RuntimeError, match="linear: input must be float32 on CPU"):
        product(torch.ones(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="linear: bias must be a contiguous float32 vector of 40"):
        few_row_product(random(40, 8, seed=5), random(41, seed=6))(torch.ones(2, 8))


def test_the_switch_turns_the_kernel_off(monkeypatch):
    """`MICO_FEW_ROW_KERNEL=0`: packed products are oneDNN's, never the kernel's."""
    monkeypatch.setenv(few_row_linear.SWITCH, "0")
    assert not few_row_kernel_available()

    def refuse(*args):
        raise AssertionError("the kernel was used although switched off")

    monkeypatch.setattr(modeling_mico_text, "few_row_product", refuse)
    weight, bias, states = random(64, 32, seed=7), random(64, seed=8), random(4, 32, seed=9)
    product = modeling_mico_text.linear_product(weight, bias, prepack=True)
    torch.testing.assert_close(product(states), F.linear(states, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_missing_source_leaves_the_kernel_out(monkeypatch, tmp_path):
    """A checkpoint's copy of the model code (`trust_remote_code`) carries no kernel source: decoding goes on
    without the kernel instead of failing."""
    monkeypatch.setattr(few_row_linear, "SOURCE", tmp_path / "few_row_linear.cpp")
    few_row_linear._extension.cache_clear()
    try:
        assert not few_row_kernel_available()
    finally:
        monkeypatch.undo()
        few_row_linear._extension.cache_clear()
    assert few_row_kernel_available()


def test_generate_packs_every_decoding_product_for_the_kernel(monkeypatch):
    """With the kernel, a single greedy caption too multiplies by packed weights (the fused projections and every
    other linear of the text tower and head); its tokens equal those decoded without the kernel and its logits
    agree within rounding."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    inputs = dict(knowledge_inputs("video", batch_size=1), num_beams=1, max_new_tokens=6)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    built = recorded_products(monkeypatch)
    with_kernel = model.generate(**inputs)
    assert built == [True] * (2 * model.config.text_config.num_hidden_layers + len(unfused_linears(model)))
    monkeypatch.setenv(few_row_linear.SWITCH, "0")
    without = model.generate(**inputs)
    assert torch.equal(with_kernel.sequences, without.sequences)
    torch.testing.assert_close(torch.stack(with_kernel.logits), torch.stack(without.logits), rtol=1e-5, atol=1e-5)
