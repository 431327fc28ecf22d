"""Decoding machinery of `generate`: the preallocated self-attention cache, fused projections and their bit-identity
with Transformers' generic decoding path (`benchmarks.bench_generation.decoding_variant`)."""

import pytest
import torch
from test_generation import knowledge_inputs, tiny_config
from transformers.cache_utils import DynamicLayer

from benchmarks.bench_generation import DECODING_VARIANTS, decoding_variant
from modeling_mico import MiCoForConditionalGeneration
from modeling_mico.generation_mico import PreallocatedCache, PreallocatedLayer
from modeling_mico.modeling_mico_text import fused_projections


@pytest.fixture(scope="module")
def model() -> MiCoForConditionalGeneration:
    torch.manual_seed(0)
    return MiCoForConditionalGeneration(tiny_config()).eval()


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=generator), torch.randn(batch, 2, length, 4, generator=generator)


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


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_variants_give_bit_identical_logits(model, num_beams):
    """One context per item, the preallocated cache and fused projections change no bit of the logits against
    Transformers' generic path."""
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
        assert all(torch.equal(a, b) for a, b in zip(output.logits, reference.logits, strict=True)), variant


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
            weight, bias = attention.fused_projection
            assert weight.shape == (3 * attention.query.out_features, attention.query.in_features)
            fused = model(input_ids=ids, context=context).logits
    assert torch.equal(fused, separate)
    assert attention.fused_projection is None and list(model.state_dict()) == keys
