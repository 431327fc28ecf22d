"""Speed options and machinery: the preallocated self-attention cache and fused projections of `generate` (bit-identical
to Transformers' generic decoding path, `benchmarks.bench_generation.decoding_variant`), `torch.compile` of the towers
with `fullgraph=True`, and the precision benchmark's smoke mode."""

import pytest
import torch
from test_generation import knowledge_inputs, tiny_config
from torch import nn
from transformers.cache_utils import DynamicLayer

from benchmarks.bench_generation import BIT_IDENTICAL_VARIANTS, DECODING_VARIANTS, decoding_variant
from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoModel, decoding_kernels, modeling_mico_text
from modeling_mico.generation_mico import PreallocatedCache, PreallocatedLayer
from modeling_mico.modeling_mico_text import fused_projections


@pytest.fixture(scope="module")
def model() -> MiCoForConditionalGeneration:
    torch.manual_seed(0)
    return MiCoForConditionalGeneration(tiny_config()).eval()


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=generator), torch.randn(batch, 2, length, 4, generator=generator)


def test_preallocated_layer_extends_in_place_and_grows():
    """`extend` advances the valid length over positions the caller writes (in the buffers while the capacity holds)
    and, past the capacity, moves the valid keys/values into larger buffers first."""
    layer = PreallocatedLayer(capacity=3)
    keys, values = states(2, 2, 0)
    layer.update(keys, values)
    buffer = layer.keys.data_ptr()
    extended_keys, extended_values = layer.extend(1)
    assert extended_keys.shape == (2, 2, 3, 4) and extended_keys.data_ptr() == buffer
    extended_keys[:, :, 2:] = 7.0
    grown_keys, grown_values = layer.extend(2)
    assert layer.capacity == 6 and layer.get_seq_length() == 5 and grown_keys.shape == (2, 2, 5, 4)
    assert torch.equal(grown_keys[:, :, :2], keys) and torch.equal(grown_values[:, :, :2], values)
    assert torch.equal(grown_keys[:, :, 2], torch.full((2, 2, 4), 7.0))


def test_preallocated_layer_equals_a_dynamic_layer():
    """Updates, crops, beam reorders, growth past the capacity and batch edits give the keys/values of Transformers'
    `DynamicLayer`; updates write into the same buffers (no reallocation) while the capacity holds."""
    preallocated, dynamic = PreallocatedLayer(capacity=6), DynamicLayer()
    steps = [
        ("update", states(3, 3, 0)),
        ("crop", -1),
        ("update", states(3, 2, 1)),
        ("reorder", torch.tensor([2, 0, 0])),
        ("crop", -1),
        ("update", states(3, 2, 2)),
        ("update", states(3, 3, 3)),  # 8 positions: past the capacity of 6
        ("reorder", torch.tensor([1, 1, 2])),
        ("repeat", 2),
        ("select", torch.tensor([5, 0, 3])),
    ]
    for step, argument in steps:
        for layer in (preallocated, dynamic):
            if step == "update":
                keys, _ = layer.update(*argument)
                if layer is preallocated:
                    written = keys
            elif step == "crop":
                layer.crop(argument)
            elif step == "reorder":
                layer.reorder_cache(argument)
            elif step == "repeat":
                layer.batch_repeat_interleave(argument)
            else:
                layer.batch_select_indices(argument)
        assert preallocated.get_seq_length() == dynamic.get_seq_length(), step
        assert torch.equal(preallocated.keys, dynamic.keys) and torch.equal(preallocated.values, dynamic.values), step
        if step == "update" and preallocated.capacity == 6:
            assert written.data_ptr() == preallocated._buffers[0].data_ptr()
    assert preallocated.capacity == 12  # doubled once
    with pytest.raises(ValueError, match="crop takes a negative number of positions to remove, got 2"):
        preallocated.crop(2)


def test_generate_decodes_into_a_preallocated_cache(model):
    inputs = knowledge_inputs("video", batch_size=2)
    output = model.generate(**inputs, num_beams=3, max_new_tokens=6, return_dict_in_generate=True)
    self_cache = output.cache.self_attention_cache
    assert isinstance(self_cache, PreallocatedCache)
    assert {layer.capacity for layer in self_cache.layers} == {1 + 6 + 1}  # [CLS], 6 tokens, the [MASK] probe
    assert self_cache.get_seq_length() == output.sequences.shape[1] - 1  # real tokens only; the last is not fed back


def sdpa_rows_are_independent() -> bool:
    """Whether SDPA gives each query row the same bits whatever the number of query rows beside it (true of the CPU
    kernel on an Intel Xeon, not on an AMD EPYC Zen 4, where 1 and 3 rows differ by 3e-7). One context per item reads
    the beams of an item as one longer query, so it is bit-identical to the generic path only where this holds."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, length, 16, generator=generator) for length in (3, 27, 27))
    together = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    apart = [torch.nn.functional.scaled_dot_product_attention(query[:, :, [row]], key, value) for row in range(3)]
    return torch.equal(together, torch.cat(apart, dim=2))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_variants_agree_with_the_generic_path(model, num_beams):
    """One context per item, the preallocated cache and fused projections change no bit of the logits against
    Transformers' generic path (with beams, where SDPA's rows are independent: `sdpa_rows_are_independent`); the
    package's packed products (taken here for 2 items) change only the last bits and no token."""
    inputs = knowledge_inputs("combined", seed=4)
    outputs = {}
    for variant in DECODING_VARIANTS:
        with decoding_variant(variant):
            outputs[variant] = model.generate(
                **inputs, num_beams=num_beams, max_new_tokens=8, output_logits=True, return_dict_in_generate=True
            )
    reference = outputs.pop("generic")
    for variant, output in outputs.items():
        assert torch.equal(output.sequences, reference.sequences), variant
        logits = torch.stack(output.logits)
        if variant in BIT_IDENTICAL_VARIANTS and (num_beams == 1 or sdpa_rows_are_independent()):
            assert torch.equal(logits, torch.stack(reference.logits)), variant
        else:  # packed products (see the next test), or beams as one query: equal within rounding
            torch.testing.assert_close(logits, torch.stack(reference.logits), rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(module) for module in model.modules())  # prepacked products are undone


def recorded_products(monkeypatch) -> list[bool]:
    """The `prepack` flag of every product `fused_projections` builds from here on."""
    built = []
    product = modeling_mico_text.linear_product

    def recording_product(weight, bias, prepack=False):
        built.append(prepack)
        return product(weight, bias, prepack=prepack)

    monkeypatch.setattr(modeling_mico_text, "linear_product", recording_product)
    return built


def unfused_linears(model: MiCoForConditionalGeneration) -> list[nn.Linear]:
    """The text tower's and head's linear layers that are not part of a fused projection."""
    attention = [m for m in model.mico.text_model.modules() if isinstance(m, modeling_mico_text.MiCoTextAttentionBase)]
    fused = {id(getattr(m, name)) for m in attention for name in m.fusable_projections}
    parts = (model.mico.text_model, model.lm_head)
    return [m for part in parts for m in part.modules() if isinstance(m, nn.Linear) and id(m) not in fused]


def test_prepacked_products_run_only_for_several_rows(model, monkeypatch):
    """Without the few-row kernel, `generate` prepacks the weights of the text tower's products and the LM head's for
    oneDNN when a step multiplies 4 rows or more (2 captions, or 1 caption with 2+ beams, e.g. the default 3); a
    single greedy caption keeps `F.linear`. The fused query/key/value linears are packed once, concatenated, not each
    on its own. Outside `keep_decoding_weights` every call builds them anew and keeps nothing."""
    monkeypatch.setenv(decoding_kernels.SWITCH, "0")
    built = recorded_products(monkeypatch)
    single = knowledge_inputs("video", batch_size=1)
    model.generate(**single, num_beams=1, max_new_tokens=3)
    attention_modules = 2 * model.config.text_config.num_hidden_layers
    assert built == [False] * attention_modules  # the fused projections, not prepacked
    for _ in range(2):
        built.clear()
        model.generate(**knowledge_inputs("video", batch_size=2), max_new_tokens=3)
        assert built == [True] * (attention_modules + len(unfused_linears(model)))
    assert not any(module in modeling_mico_text._KEPT_PRODUCTS for module in model.modules())


def test_generate_keeps_its_decoding_weights_while_the_weights_are_unchanged(monkeypatch):
    """Inside `keep_decoding_weights`, the concatenated and prepacked weights of one `generate` call serve the next
    (nothing is rebuilt, same tokens and logits) until a weight changes in place or gets new storage (`.to()`); a
    rebuilt product reads the new weights (the logits equal a fresh model's with those weights). Leaving the block
    frees them."""
    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    inputs = dict(knowledge_inputs("video", batch_size=2), num_beams=2, max_new_tokens=4)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    kept = modeling_mico_text._KEPT_PRODUCTS
    attention_modules = 2 * model.config.text_config.num_hidden_layers
    with model.keep_decoding_weights():
        first = model.generate(**inputs)
        built = recorded_products(monkeypatch)
        again = model.generate(**inputs)
        assert built == []
        assert torch.equal(again.sequences, first.sequences)
        assert torch.equal(torch.stack(again.logits), torch.stack(first.logits))

        with torch.no_grad():
            model.lm_head.decoder.bias.add_(torch.linspace(-3, 3, model.lm_head.decoder.bias.numel()))
            model.mico.text_model.encoder.layer[0].attention.self.value.weight.mul_(1.5)
        updated = model.generate(**inputs)
        assert built == [True, True]  # the first layer's self-attention (fused) and the head
        assert sum(module in kept for module in model.modules()) == attention_modules + len(unfused_linears(model))
        model.float()  # `.to()` and friends release them, so the old storage is not pinned
        assert not any(module in kept for module in model.modules())
        model.generate(**inputs)
        assert any(module in kept for module in model.modules())
    assert not any(module in kept for module in model.modules())

    fresh = MiCoForConditionalGeneration(tiny_config()).eval()
    fresh.load_state_dict(model.state_dict())
    reference = fresh.generate(**inputs)
    assert torch.equal(updated.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(updated.logits), torch.stack(reference.logits), rtol=0, atol=0)


def test_single_greedy_captions_and_beams_keep_their_decoding_weights_apart(model, monkeypatch):
    """Alternating one greedy caption (unpacked fused projections) with beams (prepacked) rebuilds nothing: both sets
    are kept."""
    single = dict(knowledge_inputs("audio", batch_size=1), max_new_tokens=3)
    with model.keep_decoding_weights():
        for num_beams in (1, 3):
            model.generate(**single, num_beams=num_beams)
        built = recorded_products(monkeypatch)
        for num_beams in (1, 3, 1, 3):
            model.generate(**single, num_beams=num_beams)
    assert built == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_adapted_and_hooked_projections_keep_their_own_forward(num_beams):
    """LoRA adapters on the attention projections and on the feed-forward layer take part in `generate` (its logits
    equal those of the merged model), and a forward hook on a projection still runs: such layers are neither fused
    nor prepacked."""
    from peft import LoraConfig

    from modeling_mico.peft_utils import build_peft_model

    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    adapters = LoraConfig(r=4, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    adapted = build_peft_model(model, adapters).eval()
    inputs = dict(knowledge_inputs("video", batch_size=2), num_beams=num_beams, max_new_tokens=5)
    inputs.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        output = adapted.generate(**inputs)
        merged = adapted.merge_and_unload().generate(**inputs)
    assert torch.equal(output.sequences, merged.sequences)
    torch.testing.assert_close(torch.stack(output.logits), torch.stack(merged.logits), rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    model = MiCoForConditionalGeneration(tiny_config()).eval()
    calls = []
    query = model.mico.text_model.encoder.layer[1].crossattention.self.query
    key = model.mico.text_model.encoder.layer[0].attention.self.key
    for layer in (query, key):
        layer.register_forward_hook(lambda module, args, output, calls=calls: calls.append(module))
    model.generate(**inputs)
    assert calls.count(key) == inputs["max_new_tokens"] and calls.count(query) == inputs["max_new_tokens"]


def test_decoding_weights_of_inference_tensors_are_rebuilt_every_call(monkeypatch):
    """Weights created under `torch.inference_mode()` count no versions, so their products are never kept."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = MiCoForConditionalGeneration(tiny_config()).eval()
        inputs = dict(knowledge_inputs("audio", batch_size=1), max_new_tokens=3)
        with model.keep_decoding_weights():
            expected = model.generate(**inputs)
            built = recorded_products(monkeypatch)
            assert torch.equal(model.generate(**inputs), expected)
    assert built == [True] * (2 * model.config.text_config.num_hidden_layers + len(unfused_linears(model)))
    assert not any(module in modeling_mico_text._KEPT_PRODUCTS for module in model.modules())


def test_fused_projections_are_bit_identical_and_scoped(model):
    """Inside `fused_projections` every attention module projects with one concatenated matrix; outside, the
    modules are as before (no fused weights kept, state dict unchanged)."""
    context = model.mico.get_multimodal_context(**knowledge_inputs("audio"))
    ids = torch.randint(110, 160, (2, 5), generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    with torch.no_grad():
        separate = model(input_ids=ids, context=context).logits
        with fused_projections(model):
            attention = model.mico.text_model.encoder.layer[0].attention.self
            assert attention.fused_projection(torch.ones(1, attention.query.in_features)).shape == (
                1,
                3 * attention.query.out_features,
            )
            fused = model(input_ids=ids, context=context).logits
    assert torch.equal(fused, separate)
    assert attention.fused_projection is None and list(model.state_dict()) == keys
    with fused_projections(model), pytest.raises(RuntimeError, match="fused_projections is for inference"):
        model(input_ids=ids, context=context)  # gradients enabled: refused rather than silently detached


@pytest.mark.slow
def test_towers_compile_with_fullgraph():
    """`_can_compile_fullgraph` holds for both towers: `torch.compile(fullgraph=True)` traces them without a graph
    break and agrees with eager float32."""
    torch.manual_seed(0)
    model = MiCoModel(MiCoConfig.from_preset("tiny")).eval()
    images = torch.randn(2, 3, 64, 64)
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    context = torch.randn(2, 9, 64)
    with torch.no_grad():
        for tower, inputs in (
            (model.vision_model, dict(pixel_values=images)),
            (model.text_model, dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=context)),
        ):
            assert type(tower)._can_compile_fullgraph
            compiled = torch.compile(tower, fullgraph=True)
            torch.testing.assert_close(
                compiled(**inputs).last_hidden_state, tower(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5
            )


def test_precision_benchmark_smoke():
    """The precision benchmark times fp32, bf16 and autocast side by side and reports their agreement with fp32 (the
    compiled variants are exercised by `test_towers_compile_with_fullgraph`)."""
    from benchmarks import bench_precision

    machine = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "read_gb_s": 10.0}
    results = bench_precision.run(smoke=True, machine=machine, variants=("fp32", "bf16", "autocast"))
    assert [tower["tower"] for tower in results["towers"]] == ["vision", "text + cross-attention"]
    for tower in results["towers"]:
        rows = {row["variant"]: row for row in tower["variants"]}
        assert list(rows) == ["fp32", "bf16", "autocast"]
        assert rows["fp32"]["hidden_rel_l2"] == 0.0 and rows["fp32"]["speedup"] == 1.0
        assert 0.0 < rows["bf16"]["hidden_rel_l2"] < 0.05 and 0.0 < rows["autocast"]["hidden_rel_l2"] < 0.05
        assert rows["bf16"]["roofline"]["dtype"] == "bf16" and rows["fp32"]["compile_s"] is None
    assert "| autocast |" in bench_precision.to_markdown(results)
    with pytest.raises(ValueError, match="variants must start with the fp32 reference"):
        bench_precision.run(smoke=True, machine=machine, variants=("bf16",))
