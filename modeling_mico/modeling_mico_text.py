"""PyTorch MiCo text branch: a BERT whose every layer carries a cross-attention block over the multimodal context, and
its masked-language-model head (as BLIP keeps `modeling_blip_text.py`)."""

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN, GELUActivation
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mico import MiCoTextConfig
from .decoding_kernels import (
    MAX_HEAD_DIM,
    PackedProduct,
    decoding_kernels_available,
    few_query_attention,
    few_row_product,
    fused_decoding_step,
)
from .generation_mico import PreallocatedLayer


# Attention implementations whose kernels take only a 2-D padding mask plus a causal flag.
FLASH_ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; `attention_mask` is additive and broadcast to (batch, heads, query, key)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def attention_forward(
    module: nn.Module, query, key, value, attention_mask, is_causal: bool, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to the attention implementation chosen in the module's config (eager, sdpa, flash, flex), with the
    module's `scaling` and `attention_dropout` (in training); returns the heads merged back to
    `(batch, length, hidden_size)` and the attention weights (eager only)."""
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=module.scaling,
        dropout=module.attention_dropout if module.training else 0.0,
        is_causal=is_causal,
        **kwargs,
    )
    return attn_output.reshape(*attn_output.shape[:2], -1).contiguous(), attn_weights


class MiCoTextEmbeddings(nn.Module):
    """Word, position and token-type embeddings followed by LayerNorm and dropout (BERT)."""

    def __init__(self, config: MiCoTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        embeddings = (
            inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class MiCoTextAttentionBase(nn.Module):
    """Query, key and value projections of a BERT attention block; keys and values read inputs of the width named by
    the config attribute `key_value_size_attribute`."""

    key_value_size_attribute = "hidden_size"

    def __init__(self, config: MiCoTextConfig, layer_idx: int):
        super().__init__()
        key_value_size = getattr(config, self.key_value_size_attribute)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # passed per call: retrieval and matching are bidirectional, captions causal
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_size, config.hidden_size)
        self.value = nn.Linear(key_value_size, config.hidden_size)

    # the projections that `fused_projections` concatenates into one matrix product, in this order
    fusable_projections: tuple[str, ...] = ()
    # the product of those projections concatenated along the outputs, while `fused_projections` is active
    fused_projection: Callable[[torch.Tensor], torch.Tensor] | None = None

    def split_heads(self, projection: nn.Linear, states: torch.Tensor) -> torch.Tensor:
        """`projection(states)` split into heads: `(batch, heads, length, head_dim)`."""
        return projection(states).view(*states.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def project_fused(self, projections: tuple[str, ...], states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The `projections` of `states`, each split into heads: one matrix product when `fused_projections` is
        active (the same values, bit for bit, as one product per projection), else one per projection."""
        if self.fused_projection is None:
            return tuple(self.split_heads(getattr(self, name), states) for name in projections)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_projections is for inference: its concatenated weights are detached, so no gradient would "
                "reach the projections; run under torch.no_grad() or torch.inference_mode()"
            )
        fused = self.fused_projection(states).view(*states.shape[:-1], len(projections), -1, self.head_dim)
        return tuple(part.transpose(1, 2) for part in fused.unbind(-3))

    def concatenated_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and biases of `fusable_projections` concatenated along the outputs."""
        layers = [getattr(self, name) for name in self.fusable_projections]
        return torch.cat([layer.weight for layer in layers]), torch.cat([layer.bias for layer in layers])


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can multiply by a prepacked copy of `weight` (float32 on a CPU with oneDNN)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes exactly `F.linear(x, module.weight, module.bias)` when called: an `nn.Linear` itself
    (not a subclass such as a quantized layer), not wrapped (an adapter such as PEFT's LoRA replaces it by a wrapper),
    with no forward hooks and no `forward` patched onto it (as accelerate's hooks do). Only such layers are fused or
    prepacked; any other keeps its own forward."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in vars(module)
    )


def linear_product(
    weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`states -> F.linear(states, weight, bias)`, or with `prepack` (see `can_prepack`) a product by a copy of the
    weight packed once, here: the few-row decoding kernel's (`few_row_product`, on CPUs with AVX-512) or else oneDNN's.
    `F.linear` on CPU hands a few-row product to MKL, which packs the weight anew at every call and reads it at a
    third to a half of the memory bandwidth (a seventh on AMD CPUs), while the packed products stream it. They sum in
    another order: their results differ from `F.linear`'s in the last bits (relative 1e-6)."""
    if not prepack:
        return lambda states: F.linear(states, weight, bias)
    if decoding_kernels_available():
        return few_row_product(weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
    return lambda states: torch.ops.mkldnn._linear_pointwise(states, packed, bias, "none", [], "")


@dataclasses.dataclass
class _KeptProduct:
    """A product built by `fused_projections` from `sources` (detached views: they keep the sources' storage alive,
    so that no other tensor can take its address) and still valid while every source has the address and version
    counter recorded in `stamps`: an in-place update (an optimizer step, `load_state_dict`) or new storage
    (`model.to(...)`, `param.data = ...`) changes one of them."""

    product: Callable[[torch.Tensor], torch.Tensor]
    sources: tuple[torch.Tensor, ...]
    stamps: tuple[tuple[int, int], ...]


# The products `fused_projections` keeps between blocks, per module and kind of product (`_product_kind`; an entry goes
# with its module).
_KEPT_PRODUCTS: weakref.WeakKeyDictionary[nn.Module, dict[str, _KeptProduct]] = weakref.WeakKeyDictionary()


def _product_kind(prepack: bool) -> str:
    """What `linear_product(..., prepack=prepack)` builds now: the kernels can be switched on and off between calls."""
    if not prepack:
        return "unpacked"
    return "kernel" if decoding_kernels_available() else "oneDNN"


def _stamps(sources: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], ...] | None:
    """Address and version counter of each source; `None` for inference tensors, which count no versions (their
    products are rebuilt every time)."""
    if any(source.is_inference() for source in sources):
        return None
    return tuple((source.data_ptr(), source._version) for source in sources)


def _product_for(
    module: nn.Module,
    sources: tuple[torch.Tensor, ...],
    weight_and_bias: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
    prepack: bool,
    keep: bool,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The kept product of `module` of the kind `prepack` builds now if it was built from `sources` as they are now,
    else the `linear_product` of `weight_and_bias()`, kept when `keep`. Kept products of stale sources are dropped
    first."""
    stamps = _stamps(sources)
    kept = {kind: product for kind, product in _KEPT_PRODUCTS.pop(module, {}).items() if product.stamps == stamps}
    kind = _product_kind(prepack)
    if kind in kept:
        product = kept[kind].product
    else:
        product = linear_product(*weight_and_bias(), prepack=prepack)
        if keep and stamps is not None:
            kept[kind] = _KeptProduct(product, tuple(source.detach() for source in sources), stamps)
    if kept:
        _KEPT_PRODUCTS[module] = kept
    return product


def _weight_and_bias(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight, linear.bias


def release_decoding_weights(model: nn.Module) -> None:
    """Free the concatenated and prepacked weights that `fused_projections(..., keep=True)` kept for the modules of
    `model`."""
    for module in model.modules():
        _KEPT_PRODUCTS.pop(module, None)


def _attends_with_kernel(module: nn.Module) -> bool:
    """Whether `fused_projections` lets the cross-attention `module` attend with `few_query_attention`: the decoding
    kernels serve, the model uses SDPA (eager and the other implementations keep their own path, e.g. to return the
    attention weights) and the head fits the kernel."""
    return (
        isinstance(module, MiCoTextCrossAttention)
        and module.config._attn_implementation == "sdpa"
        and module.head_dim <= MAX_HEAD_DIM
        and decoding_kernels_available()
    )


@contextlib.contextmanager
def fused_projections(
    model: nn.Module, *others: nn.Module, prepack: bool = False, keep: bool = False
) -> Iterator[None]:
    """Within the block, every text attention module of `model` projects with one matrix product: query, key and
    value together for self-attention, key and value of the context for cross-attention, when those projections are
    plain linear layers (`is_plain_linear`: an adapted, quantized or hooked projection keeps its own forward, so that
    adapters and hooks still apply). The module parameters and state-dict keys are untouched. Inference only: a
    forward pass with gradients enabled inside the block raises a `RuntimeError`. In float32 every output column is
    the same reduction as with separate products, so the results are bit-identical (`tests/test_performance.py`);
    `generate` decodes inside it.

    With `prepack` (on a CPU where `can_prepack`; elsewhere it is ignored) every plain linear layer of `model` and of
    `others` (the language-model head) also multiplies by a packed weight (`linear_product`), and, where the decoding
    kernels serve, cross-attention attends with `few_query_attention` (`_attends_with_kernel`), and a decoding step of
    a `MiCoTextModel` runs all its layers in one call of the kernels' fused step (`_fused_decoding_step`, see
    `MiCoTextModel`): `generate` does so at
    every step where the kernels serve, else when a step multiplies 4 rows or more (several captions or beams), where
    each product is 1.3-9x faster, with results within relative 1e-6 of the unpacked ones instead of bit-identical.

    The concatenated (and packed) weights are built on entry from the weights as they are then. With `keep` they are
    kept after the block, packed and unpacked apart (the packed ones are about one more copy of the text tower's and
    head's weights), and reused by later blocks while the weights they come from are unchanged (same storage, no
    in-place update); `release_decoding_weights` frees them. Packing costs about 1 ms per MB of weights: `generate`
    keeps them inside `MiCoForConditionalGeneration.keep_decoding_weights`."""
    modules = [
        module
        for module in model.modules()
        if isinstance(module, MiCoTextAttentionBase)
        and all(is_plain_linear(getattr(module, name)) for name in module.fusable_projections)
    ]
    fused = {id(getattr(module, name)) for module in modules for name in module.fusable_projections}
    linears = [
        module
        for root in ((model, *others) if prepack else ())
        for module in root.modules()
        if is_plain_linear(module) and id(module) not in fused and can_prepack(module.weight)
    ]
    try:
        with torch.no_grad():
            for module in modules:
                layers = [getattr(module, name) for name in module.fusable_projections]
                sources = (*(layer.weight for layer in layers), *(layer.bias for layer in layers))
                packed = prepack and can_prepack(layers[0].weight)
                module.fused_projection = _product_for(module, sources, module.concatenated_projection, packed, keep)
                if packed and _attends_with_kernel(module):
                    module.decoding_attention = few_query_attention
            for module in linears:
                sources = (module.weight,) if module.bias is None else (module.weight, module.bias)
                module.forward = _product_for(module, sources, functools.partial(_weight_and_bias, module), True, keep)
            if isinstance(model, MiCoTextModel):
                model.fused_decoding_step = _fused_decoding_step(model)
        yield
    finally:
        model.__dict__.pop("fused_decoding_step", None)
        for module in modules:
            module.__dict__.pop("fused_projection", None)
            module.__dict__.pop("decoding_attention", None)
        for module in linears:
            module.__dict__.pop("forward", None)


def _has_user_hooks(module: nn.Module) -> bool:
    """Whether a forward (pre-)hook other than Transformers' output-capturing hooks (which `MiCoTextModel` disables
    the fused step for when outputs are requested) sits on `module` or below."""
    return any(
        getattr(hook, "__name__", None) != "output_capturing_hook"
        for submodule in module.modules()
        for hook in (*submodule._forward_hooks.values(), *submodule._forward_pre_hooks.values())
    )


def _packed_product(module: nn.Module, attribute: str = "forward") -> PackedProduct | None:
    """The `PackedProduct` that `fused_projections` set as `module.<attribute>`, if it did (with a bias)."""
    product = vars(module).get(attribute)
    return product if isinstance(product, PackedProduct) and product.bias is not None else None


def _layer_norm_parameters(norm: nn.Module, eps: float) -> list[torch.Tensor] | None:
    """Weight and bias of a plain affine `nn.LayerNorm` over the last dimension with epsilon `eps`."""
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.bias is None or norm.eps != eps:
        return None
    return [norm.weight.detach(), norm.bias.detach()]


def _fused_decoding_step(model: "MiCoTextModel") -> Callable[..., torch.Tensor] | None:
    """The kernels' fused decoding step over the products `fused_projections` packed for `model`'s layers, or `None`
    where it would not compute what the layer modules compute: every product of a layer packed (plain linear layers
    with biases), plain LayerNorms, exact GELU, cross-attention by `few_query_attention`, and no hook on the layers."""
    config = model.config
    if config.hidden_act != "gelu" or _has_user_hooks(model.encoder):
        return None
    weights = []
    for layer in model.encoder.layer:
        parts = [
            _packed_product(layer.attention.self, "fused_projection"),
            _packed_product(layer.attention.output.dense),
            _layer_norm_parameters(layer.attention.output.LayerNorm, config.layer_norm_eps),
            _packed_product(layer.crossattention.self.query),
            _packed_product(layer.crossattention.output.dense),
            _layer_norm_parameters(layer.crossattention.output.LayerNorm, config.layer_norm_eps),
            _packed_product(layer.intermediate.dense),
            _packed_product(layer.output.dense),
            _layer_norm_parameters(layer.output.LayerNorm, config.layer_norm_eps),
        ]
        activation = layer.intermediate.intermediate_act_fn
        if (
            any(part is None for part in parts)
            or layer.crossattention.self.decoding_attention is None
            or type(activation) is not GELUActivation
            or activation.act is not F.gelu
        ):
            return None
        for part in parts:
            weights.extend([part.packed, part.bias] if isinstance(part, PackedProduct) else part)
    return fused_decoding_step(weights, config.num_attention_heads, config.layer_norm_eps)


class MiCoTextSelfAttention(MiCoTextAttentionBase):
    """Self-attention over the text; keys/values of processed tokens go to `cache` when one is given."""

    fusable_projections = ("query", "key", "value")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        is_causal: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project_fused(self.fusable_projections, hidden_states)
        if cache is not None:
            self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            key, value = self_cache.update(key, value, self.layer_idx)
        return attention_forward(self, query, key, value, attention_mask, is_causal, **kwargs)


class MiCoTextCrossAttention(MiCoTextAttentionBase):
    """Attention from the text to the (never masked) multimodal context; context keys/values are cached once.

    The context may hold one item for several consecutive text rows (the beams or returned sequences of an item,
    `rows = items * r`): the rows of an item are then read as one longer query over the item's keys/values, so that
    what the rows share is computed, stored and read once instead of copied per row."""

    key_value_size_attribute = "encoder_hidden_size"
    fusable_projections = ("key", "value")
    # `few_query_attention` while `fused_projections` decodes with the decoding kernels (SDPA otherwise)
    decoding_attention: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cache: EncoderDecoderCache | None = None,
        is_causal: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, length, width = hidden_states.shape
        items = encoder_hidden_states.shape[0]
        hidden_states = hidden_states.reshape(items, (rows // items) * length, width)
        query = self.split_heads(self.query, hidden_states)
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer_cache = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer_cache.keys, layer_cache.values
        else:
            key, value = self.project_fused(self.fusable_projections, encoder_hidden_states)
            if cache is not None:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        # the context is never masked and never causal, whatever the text side does
        if self.decoding_attention is not None and not self.training:
            attn_output = self.decoding_attention(query, key, value, self.scaling).transpose(1, 2)
            return attn_output.reshape(rows, length, width), None
        attn_output, attn_weights = attention_forward(self, query, key, value, None, False, **kwargs)
        if attn_weights is not None and rows != items:  # (items, heads, r * length, context) -> per row
            attn_weights = attn_weights.unflatten(2, (rows // items, length)).transpose(1, 2).flatten(0, 1)
        return attn_output.reshape(rows, length, width), attn_weights


class MiCoTextResidualOutput(nn.Module):
    """Dense projection, dropout, residual connection and LayerNorm closing every BERT sub-layer."""

    def __init__(self, config: MiCoTextConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class MiCoTextAttentionBlock(nn.Module):
    """An attention module and its residual output, named as in BERT (`attention.self`, `attention.output`)."""

    def __init__(self, config: MiCoTextConfig, layer_idx: int, is_cross_attention: bool):
        super().__init__()
        attention_class = MiCoTextCrossAttention if is_cross_attention else MiCoTextSelfAttention
        self.self = attention_class(config, layer_idx)
        self.output = MiCoTextResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attn_output, _ = self.self(hidden_states, *args, **kwargs)
        return self.output(attn_output, hidden_states)


class MiCoTextIntermediate(nn.Module):
    def __init__(self, config: MiCoTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class MiCoTextLayer(GradientCheckpointingLayer):
    """Self-attention, then cross-attention to the context when one is given, then the feed-forward block."""

    def __init__(self, config: MiCoTextConfig, layer_idx: int):
        super().__init__()
        self.attention = MiCoTextAttentionBlock(config, layer_idx, is_cross_attention=False)
        self.crossattention = MiCoTextAttentionBlock(config, layer_idx, is_cross_attention=True)
        self.intermediate = MiCoTextIntermediate(config)
        self.output = MiCoTextResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        hidden_states = self.attention(hidden_states, attention_mask, cache=cache, **kwargs)
        if encoder_hidden_states is not None:
            hidden_states = self.crossattention(hidden_states, encoder_hidden_states, cache=cache, **kwargs)
        return self.output(self.intermediate(hidden_states), hidden_states)


class MiCoTextEncoder(nn.Module):
    def __init__(self, config: MiCoTextConfig):
        super().__init__()
        self.layer = nn.ModuleList([MiCoTextLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs):
        for layer in self.layer:
            # the context is positional so that gradient checkpointing passes it through
            hidden_states = layer(hidden_states, attention_mask, encoder_hidden_states, cache=cache, **kwargs)
        return hidden_states


class MiCoLMHead(nn.Module):
    """BERT's masked-language-model head; the decoder weight is tied to the word embeddings."""

    def __init__(self, config: MiCoTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.transform_act_fn(self.dense(hidden_states))))


class MiCoTextPreTrainedModel(PreTrainedModel):
    """Weight initialisation and attention back-ends of the text branch."""

    config: MiCoTextConfig
    base_model_prefix = "text_model"
    main_input_name = "input_ids"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiCoTextLayer", "MiCoTextEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # tests/test_performance.py::test_towers_compile_with_fullgraph
    _can_record_outputs = {
        "hidden_states": MiCoTextLayer,
        "attentions": OutputRecorder(MiCoTextSelfAttention, index=1),
        "cross_attentions": OutputRecorder(MiCoTextCrossAttention, index=1),
    }


def prefix_overlay(prefix_length: int) -> Callable:
    """Mask function letting every query see the first `prefix_length` positions (a question read
    bidirectionally); combined with the causal mask by `or`, as in the original question answering."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < prefix_length

    return inner_mask


def check_text_inputs(config, batch_size: int, length: int, attention_mask: torch.Tensor | None) -> None:
    """Refuse text longer than the position table and an attention mask whose rows do not match the text's."""
    if length > config.max_position_embeddings:
        raise ValueError(
            f"the text is {length} tokens long but the model has {config.max_position_embeddings} positions "
            "(text_config.max_position_embeddings); truncate it (the processor's max_length / truncation=True)"
        )
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape != (batch_size, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the text is {(batch_size, length)} "
            "(batch, past + sequence length): give one mask row per text row, as long as the text"
        )


class MiCoTextModel(MiCoTextPreTrainedModel):
    r"""
    MiCo's text branch: BERT with a cross-attention block in every layer. Without `encoder_hidden_states` it is the
    plain text encoder of retrieval; with them it reads the multimodal context (matching, captioning).

    Attention masks are built with `transformers.masking_utils` for the configured attention implementation: a 2-D
    padding mask gives a bidirectional mask, or with `is_causal=True` the caption decoder's causal mask (optionally
    with a bidirectional `prefix_length`). The context is never masked.

    Limits of `flash_attention_*`: its kernels take a padding mask and a causal flag only, so an explicit 3-D mask and
    a bidirectional prefix inside a causal mask (question answering) raise a `ValueError`; use `"sdpa"` or
    `"flex_attention"` for those.

    Example:

    ```python
    >>> import torch
    >>> from modeling_mico import MiCoConfig, MiCoTextModel

    >>> model = MiCoTextModel(MiCoConfig.from_preset("tiny").text_config)  # 64 wide, 2 layers
    >>> context = torch.randn(2, 5, 64)
    >>> out = model(input_ids=torch.randint(1000, (2, 7)), encoder_hidden_states=context, is_causal=True)
    >>> out.last_hidden_state.shape
    torch.Size([2, 7, 64])

    ```
    """

    # the kernels' decoding step of all layers while `fused_projections` decodes with them (`_fused_decoding_step`)
    fused_decoding_step: Callable[..., torch.Tensor] | None = None

    def __init__(self, config: MiCoTextConfig):
        super().__init__(config)
        self.embeddings = MiCoTextEmbeddings(config)
        self.encoder = MiCoTextEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        is_causal: bool = False,
        prefix_length: int = 0,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                WordPiece ids (give these or `inputs_embeds`).
            attention_mask (`torch.Tensor`, *optional*):
                `(batch_size, past_length + sequence_length)` padding mask (1 = real token), or an explicit
                `(batch_size, sequence_length, past_length + sequence_length)` mask with 1 where attention is allowed,
                or a mask already prepared for the attention implementation (4-D).
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Segment ids (0 by default).
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions; by default `past_length .. past_length + sequence_length - 1`.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Word embeddings to use instead of looking `input_ids` up.
            encoder_hidden_states (`torch.Tensor` of shape `(items, context_length, hidden_size)`, *optional*):
                The multimodal context. Cross-attention sees every position of it. `items` is `batch_size` or a
                divisor of it: then every item is the context of `batch_size // items` consecutive text rows (beams,
                returned sequences), and its keys/values are computed and cached once, not per row.
            cache ([`Cache`], *optional*):
                An [`EncoderDecoderCache`] of earlier self-attention keys/values and of the context's cross-attention
                keys/values (a plain [`DynamicCache`] holds the self-attention part only).
            is_causal (`bool`, *optional*, defaults to `False`):
                Causal self-attention (the caption decoder) instead of bidirectional attention.
            prefix_length (`int`, *optional*, defaults to 0):
                With `is_causal`, the number of leading positions that every position sees (a question read
                bidirectionally).

        Returns:
            [`BaseModelOutputWithPastAndCrossAttentions`]: `last_hidden_state` of every position (no pooler), the
            cache, and with `output_hidden_states` / `output_attentions` the per-layer states and (cross-)attentions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        batch_size, seq_length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0
        check_text_inputs(self.config, batch_size, past_length + seq_length, attention_mask)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=device)
            position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
        hidden_states = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)
        attention_mask = self._attention_mask(attention_mask, hidden_states, cache, is_causal, prefix_length)
        if encoder_hidden_states is not None:
            if encoder_hidden_states.dim() != 3 or batch_size % encoder_hidden_states.shape[0]:
                raise ValueError(
                    "encoder_hidden_states must be (items, context_length, hidden_size) with the text batch "
                    f"({batch_size}) a multiple of items, got shape {tuple(encoder_hidden_states.shape)}"
                )
            encoder_hidden_states = encoder_hidden_states.to(hidden_states.dtype)
        if self._takes_fused_step(hidden_states, attention_mask, encoder_hidden_states, cache, kwargs):
            self_cache, context_cache = cache.self_attention_cache.layers, cache.cross_attention_cache.layers
            keys, values = zip(*(layer.extend(seq_length) for layer in self_cache))
            hidden_states = self.fused_decoding_step(
                hidden_states,
                attention_mask,
                list(keys),
                list(values),
                [layer.keys for layer in context_cache],
                [layer.values for layer in context_cache],
            )
        else:
            hidden_states = self.encoder(
                hidden_states, attention_mask, encoder_hidden_states, cache=cache, is_causal=is_causal, **kwargs
            )
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)

    def _takes_fused_step(self, hidden_states, attention_mask, encoder_hidden_states, cache, kwargs) -> bool:
        """Whether this forward pass is a decoding step that `fused_decoding_step` (set by `fused_projections` where
        the decoding kernels serve) computes as the layers would: in inference, float32, with a context whose keys and
        values are cached, a preallocated self-attention cache holding earlier tokens, a boolean (or no) SDPA mask,
        and no attentions or hidden states to record."""
        if (
            self.fused_decoding_step is None
            or self.training
            or torch.is_grad_enabled()
            or encoder_hidden_states is None
            or hidden_states.dtype != torch.float32
            or any(
                kwargs.get(name, getattr(self.config, name)) for name in ("output_attentions", "output_hidden_states")
            )
            or not isinstance(cache, EncoderDecoderCache)
        ):
            return False
        num_layers = self.config.num_hidden_layers
        self_cache = cache.self_attention_cache.layers
        return (
            all(cache.is_updated.get(index) for index in range(num_layers))
            and len(self_cache) == num_layers
            and all(isinstance(layer, PreallocatedLayer) and layer.is_initialized for layer in self_cache)
            and (
                attention_mask is None
                or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
            )
        )

    def _attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        hidden_states: torch.Tensor,
        cache: Cache | None,
        is_causal: bool,
        prefix_length: int,
    ):
        """The mask of the configured attention implementation (see the class docstring for flash's limits)."""
        implementation = self.config._attn_implementation
        if attention_mask is not None and attention_mask.dim() == 3:
            if implementation in FLASH_ATTENTION_IMPLEMENTATIONS:
                raise ValueError(
                    f"{implementation} cannot take an explicit 3-D attention mask (its kernels take a padding mask and "
                    "a causal flag only); pass a 2-D padding mask with is_causal, or use attn_implementation='sdpa'"
                )
            min_value = torch.finfo(hidden_states.dtype).min
            allowed = attention_mask[:, None].to(device=hidden_states.device, dtype=torch.bool)
            return torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(
                ~allowed, min_value
            )
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(
                "attention_mask must be (batch, sequence), (batch, query, key) or prepared 4-D, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if not is_causal:
            if prefix_length:
                raise ValueError("prefix_length only applies to causal attention (is_causal=True)")
            return create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        or_mask_function = None
        if prefix_length:
            if implementation in FLASH_ATTENTION_IMPLEMENTATIONS:
                raise ValueError(
                    f"{implementation} cannot express a bidirectional prefix inside a causal mask (question "
                    "answering); use attn_implementation='sdpa' or 'flex_attention'"
                )
            or_mask_function = prefix_overlay(prefix_length)
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=self_cache,
            or_mask_function=or_mask_function,
        )


__all__ = [
    "MiCoLMHead",
    "MiCoTextModel",
    "MiCoTextPreTrainedModel",
    "fused_projections",
    "release_decoding_weights",
]
