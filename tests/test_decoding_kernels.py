"""The decoding kernels (`modeling_mico.decoding_kernels`): the few-row products and the few-query attention against
float64, their independence of the other rows, their errors, the switch that turns them off and their use by
`generate`."""

import sys

import pytest
import torch
from test_generation import knowledge_inputs, tiny_config
from test_performance import recorded_products, unfused_linears
from torch.nn import functional as F

from modeling_mico import MiCoForConditionalGeneration, decoding_kernels, modeling_mico_text
from modeling_mico.decoding_kernels import decoding_kernels_available, few_query_attention, few_row_product


pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="the decoding kernels run on Linux CPUs with AVX-512 only",
)


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_kernels_build_on_an_avx512_cpu():
    assert decoding_kernels_available()


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


def context_keys_and_values(items: int, heads: int, length: int, head_dim: int, seed: int):
    """Keys and values laid out as the fused context projection leaves them: strided views of one tensor."""
    fused = random(items, length, 2, heads, head_dim, seed=seed)
    return fused[:, :, 0].transpose(1, 2), fused[:, :, 1].transpose(1, 2)


@pytest.mark.parametrize("head_dim", [8, 16, 40, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 7, 13])
def test_attention_matches_float64_as_closely_as_sdpa(head_dim, rows):
    """Every head size (partial last chunk of 16 or not) and row count (blocks of 6 and their remainders): within
    three times SDPA's own error against float64, or 8 units in the last place of the largest output (exponentials
    within 2 units, 77 values summed in order)."""
    key, value = context_keys_and_values(2, 3, 77, head_dim, seed=10)
    query = random(2, 3, rows, head_dim, seed=11)
    scale = head_dim**-0.5
    reference = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), scale=scale)
    output = few_query_attention(query, key, value, scale)
    assert output.shape == query.shape and output.dtype == torch.float32
    sdpa_error = (F.scaled_dot_product_attention(query, key, value, scale=scale).double() - reference).abs().max()
    last_place = torch.finfo(torch.float32).eps * reference.abs().max().item()
    assert (output.double() - reference).abs().max().item() <= max(3 * sdpa_error.item(), 8 * last_place)


def test_attention_rows_do_not_change_each_other():
    key, value = context_keys_and_values(1, 2, 50, 64, seed=12)
    query = random(1, 2, 9, 64, seed=13)
    together = few_query_attention(query, key, value, 0.125)
    alone = torch.cat([few_query_attention(query[:, :, [row]], key, value, 0.125) for row in range(9)], dim=2)
    assert torch.equal(together, alone)


def test_mismatched_attention_inputs_are_refused():
    key, value = context_keys_and_values(1, 2, 5, 16, seed=14)
    with pytest.raises(RuntimeError, match=r"attention: key and value must be \(1, 3, length, 16\)"):
        few_query_attention(random(1, 3, 2, 16, seed=15), key, value, 0.25)
    with pytest.raises(RuntimeError, match=r"attention: head dimension 130 outside 1\.\.128"):
        wide = random(1, 1, 4, 130, seed=16)
        few_query_attention(wide[:, :, :1], wide, wide, 0.1)
    with pytest.raises(RuntimeError, match="attention: key and value need contiguous head vectors"):
        every_other = random(1, 2, 5, 32, seed=18)[..., ::2]  # (1, 2, 5, 16) with stride 2 along the head
        few_query_attention(random(1, 2, 2, 16, seed=17), key, every_other, 0.25)


def test_the_switch_turns_the_kernel_off(monkeypatch):
    """`MICO_DECODING_KERNELS=0`: packed products are oneDNN's, never the kernel's, and cross-attention is SDPA's."""
    monkeypatch.setenv(decoding_kernels.SWITCH, "0")
    assert not decoding_kernels_available()

    def refuse(*args):
        raise AssertionError("the kernel was used although switched off")

    monkeypatch.setattr(modeling_mico_text, "few_row_product", refuse)
    weight, bias, states = random(64, 32, seed=7), random(64, seed=8), random(4, 32, seed=9)
    product = modeling_mico_text.linear_product(weight, bias, prepack=True)
    torch.testing.assert_close(product(states), F.linear(states, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_missing_source_leaves_the_kernel_out(monkeypatch, tmp_path):
    """A checkpoint's copy of the model code (`trust_remote_code`) carries no kernel source: decoding goes on
    without the kernel instead of failing."""
    monkeypatch.setattr(decoding_kernels, "SOURCE", tmp_path / "few_row_linear.cpp")
    decoding_kernels._extension.cache_clear()
    try:
        assert not decoding_kernels_available()
    finally:
        monkeypatch.undo()
        decoding_kernels._extension.cache_clear()
    assert decoding_kernels_available()


def attention_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The query shape of every `few_query_attention` call from here on."""
    calls = []

    def recording_attention(query, key, value, scale):
        calls.append(tuple(query.shape))
        return few_query_attention(query, key, value, scale)

    monkeypatch.setattr(modeling_mico_text, "few_query_attention", recording_attention)
    return calls


def fused_steps(monkeypatch) -> list[tuple[int, ...]]:
    """The hidden-state shape of every call of a fused decoding step built from here on."""
    calls = []
    build = modeling_mico_text.fused_decoding_step

    def recording_build(*args):
        step = build(*args)

        def recording_step(hidden, *rest):
            calls.append(tuple(hidden.shape))
            return step(hidden, *rest)

        return recording_step

    monkeypatch.setattr(modeling_mico_text, "fused_decoding_step", recording_build)
    return calls


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_decodes_with_the_kernels(monkeypatch, num_beams):
    """With the kernels, a single greedy caption too multiplies by packed weights (the fused projections and every
    other linear of the text tower and head) and attends to the context with `few_query_attention` (the beams of an
    item as one query: 2 rows each with the [MASK] probe); its tokens equal those decoded without the kernels and its
    logits agree within rounding. With eager attention, cross-attention keeps its own path."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    steps = 6
    inputs = dict(knowledge_inputs("video", batch_size=1), num_beams=num_beams, max_new_tokens=steps)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    built, calls, steps_taken = recorded_products(monkeypatch), attention_calls(monkeypatch), fused_steps(monkeypatch)
    with_kernel = model.generate(**inputs)
    assert built == [True] * (2 * layers + len(unfused_linears(model)))
    head_dim = model.config.text_config.hidden_size // heads
    # the first step (which projects the context) through the layer modules: one item, a token and a probe per beam
    assert calls == [(1, heads, 2 * num_beams, head_dim)] * layers
    # every later step through all layers at once
    assert steps_taken == [(num_beams, 2, model.config.text_config.hidden_size)] * (steps - 1)

    calls.clear()
    steps_taken.clear()
    eager = MiCoForConditionalGeneration._from_config(tiny_config(), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    eager_output = eager.generate(**inputs)
    assert calls == [] and steps_taken == [] and torch.equal(eager_output.sequences, with_kernel.sequences)

    monkeypatch.setenv(decoding_kernels.SWITCH, "0")
    without = model.generate(**inputs)
    assert torch.equal(with_kernel.sequences, without.sequences)
    torch.testing.assert_close(torch.stack(with_kernel.logits), torch.stack(without.logits), rtol=1e-5, atol=1e-5)


def test_kept_decoding_weights_follow_the_switch(monkeypatch):
    """Inside `keep_decoding_weights`, switching the kernels off between calls builds oneDNN's products instead of
    reusing the kernel's (and the kernel's serve again, unbuilt, once switched back on)."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    inputs = dict(knowledge_inputs("video", batch_size=2), max_new_tokens=3)
    used = []
    monkeypatch.setattr(
        modeling_mico_text, "few_row_product", lambda *args: used.append("kernel") or few_row_product(*args)
    )
    with model.keep_decoding_weights():
        model.generate(**inputs)
        products = len(used)
        assert products > 0
        built = recorded_products(monkeypatch)
        monkeypatch.setenv(decoding_kernels.SWITCH, "0")
        model.generate(**inputs)
        assert len(built) == products and len(used) == products  # rebuilt, for oneDNN
        built.clear()
        monkeypatch.delenv(decoding_kernels.SWITCH)
        model.generate(**inputs)
        assert built == [] and len(used) == products  # the kept kernel products


def without_fused_step(monkeypatch) -> None:
    """Decode every step through the layer modules (the kernels' products and cross-attention still serve)."""
    monkeypatch.setattr(modeling_mico_text, "_fused_decoding_step", lambda model: None)


QUESTION = torch.tensor([[101, 7, 8, 9, 102, 0, 0], [101, 20, 21, 102, 0, 0, 0]])


@pytest.mark.parametrize(
    "case",
    [
        dict(batch_size=2, num_beams=1),
        dict(batch_size=1, num_beams=3),
        dict(batch_size=2, num_beams=3, input_ids=QUESTION, attention_mask=(QUESTION != 0).long()),
        dict(batch_size=2, num_beams=2, input_ids=QUESTION, num_return_sequences=2),
    ],
    ids=["greedy", "beams", "padded question", "question, mask from [PAD]"],
)
def test_the_fused_step_decodes_as_the_layers(monkeypatch, case):
    """Greedy, beams, and a question prefix read bidirectionally with padding (the self-attention mask): the fused
    step of all layers gives the tokens of the layer modules and their logits within rounding (its self-attention is
    the kernel's, the modules' SDPA)."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    case = dict(case)
    inputs = dict(knowledge_inputs("video", batch_size=case.pop("batch_size")), **case, max_new_tokens=12)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    steps_taken = fused_steps(monkeypatch)
    fused = model.generate(**inputs)
    assert len(steps_taken) == 11
    without_fused_step(monkeypatch)
    layers = model.generate(**inputs)
    assert torch.equal(fused.sequences, layers.sequences)
    torch.testing.assert_close(torch.stack(fused.logits), torch.stack(layers.logits), rtol=1e-5, atol=1e-5)


def test_the_fused_step_stands_aside_for_hooks_and_recorded_outputs(monkeypatch):
    """Requested attentions or hidden states, and a forward hook anywhere in the text layers, take the layer modules:
    the hidden states of every step are returned and the hook fires at every step."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    layers = model.config.text_config.num_hidden_layers
    inputs = dict(knowledge_inputs("video", batch_size=1), num_beams=1, max_new_tokens=5)
    steps_taken = fused_steps(monkeypatch)
    recorded = model.generate(**inputs, output_hidden_states=True, return_dict_in_generate=True)
    assert steps_taken == [] and len(recorded.hidden_states) == 5
    assert all(len(step) == layers + 1 for step in recorded.hidden_states)
    model.generate(**inputs, output_attentions=True, return_dict_in_generate=True)
    assert steps_taken == []

    fired = []
    handle = model.mico.text_model.encoder.layer[-1].output.LayerNorm.register_forward_hook(
        lambda module, args, output: fired.append(output.shape)
    )
    try:
        hooked = model.generate(**inputs)
    finally:
        handle.remove()
    assert steps_taken == [] and len(fired) == 5
    assert torch.equal(hooked, model.generate(**inputs)) and len(steps_taken) == 4


def test_the_fused_step_rejects_caches_of_another_shape():
    """The C++ step checks what it is given and names it."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    text = model.mico.text_model
    config = text.config
    heads, width = config.num_attention_heads, config.hidden_size
    with torch.no_grad(), modeling_mico_text.fused_projections(text, prepack=True):
        step = text.fused_decoding_step
        assert step is not None
        layers = config.num_hidden_layers
        hidden = torch.randn(2, 2, width)
        keys = [torch.zeros(2, heads, 5, width // heads) for _ in range(layers)]
        context = [torch.zeros(1, heads, 7, width // heads) for _ in range(layers)]
        out = step(hidden, None, keys, [key.clone() for key in keys], context, context)
        assert out.shape == (2, 2, width) and torch.isfinite(out).all()
        assert keys[0][:, :, 3:].abs().sum() > 0  # the step's keys written into the last 2 positions
        with pytest.raises(RuntimeError, match=r"self-attention cache of layer 0 must be float32 \(2, 2, 5, 16\)"):
            step(hidden, None, [key[:, :1] for key in keys], keys, context, context)
        with pytest.raises(RuntimeError, match="3 rows for 2 context items"):
            step(torch.randn(3, 2, width), None, keys, keys, [torch.zeros(2, heads, 7, 16)] * layers, context)
        with pytest.raises(RuntimeError, match=r"mask must be boolean \(2, 1, 2, 5\)"):
            step(hidden, torch.ones(2, 1, 2, 4, dtype=torch.bool), keys, keys, context, context)
    assert "fused_decoding_step" not in vars(text)
