"""PyTorch MiCo: one EVA vision transformer for every knowledge modality and a cross-attention BERT for language."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
    CausalLMOutputWithCrossAttentions,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mico import MiCoConfig, MiCoTextConfig, MiCoVisionConfig
from .distributed import all_gather_no_grad, all_gather_with_grad, present_everywhere


logger = logging.get_logger(__name__)

# Model input name -> (knowledge modality, name used for features and outputs).
KNOWLEDGE_INPUTS = {
    "pixel_values": ("vision", "image"),
    "pixel_values_videos": ("vision", "video"),
    "input_features": ("audio", "audio"),
    "depth_values": ("depth", "depth"),
}

# Order of the parts of a multimodal context; modalities added by configuration come after depth.
CONTEXT_ORDER = ("vision", "audio", "depth")


def knowledge_input_names(config: MiCoConfig) -> dict[str, tuple[str, str]]:
    """Every model input that carries a knowledge modality, including `<name>_values` for configured extras."""
    names = {key: value for key, value in KNOWLEDGE_INPUTS.items() if value[0] in config.knowledge_modalities}
    for modality in config.knowledge_modalities:
        if modality not in CONTEXT_ORDER:
            names[f"{modality}_values"] = (modality, modality)
    return names


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


def _attention(module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float, **kwargs):
    """Dispatch to the attention implementation chosen in the module's config (eager, sdpa, flash, flex)."""
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    return attention_interface(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout if module.training else 0.0, **kwargs
    )


# --------------------------------------------------------------------------------------------------------------------
# Vision tower: EVA-CLIP ViT
# --------------------------------------------------------------------------------------------------------------------


class MiCoVisionEmbeddings(nn.Module):
    """Patch embedding, class token and learned absolute position embedding."""

    def __init__(self, config: MiCoVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height != self.config.image_size or width != self.config.image_size:
            raise ValueError(
                f"pixel values must be {self.config.image_size}x{self.config.image_size} images, got {height}x{width}; "
                "resize them with MiCoProcessor or load the model with another `image_size`."
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        class_tokens = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([class_tokens, patches], dim=1) + self.position_embedding


class MiCoVisionAttention(nn.Module):
    """EVA attention: a fused `qkv` projection with learned query and value biases and no key bias."""

    def __init__(self, config: MiCoVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.v_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        # calling the `qkv` module (not its weight) keeps adapters such as LoRA on it in the computation
        qkv = self.qkv(hidden_states) + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        query, key, value = qkv.view(batch_size, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_output, attn_weights = _attention(
            self, query, key, value, None, self.scaling, self.config.attention_dropout, **kwargs
        )
        return self.proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights


class MiCoVisionMLP(nn.Module):
    def __init__(self, config: MiCoVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MiCoVisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block (no layer scale, no rotary embedding, no sub-LN)."""

    def __init__(self, config: MiCoVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MiCoVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MiCoVisionMLP(config)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.layer_norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class MiCoVisionEncoder(nn.Module):
    def __init__(self, config: MiCoVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([MiCoVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> BaseModelOutput:
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


# --------------------------------------------------------------------------------------------------------------------
# Text branch: BERT with a cross-attention block in every layer
# --------------------------------------------------------------------------------------------------------------------


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
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        token_type_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class MiCoTextSelfAttention(nn.Module):
    """Self-attention over the text; keys/values of processed tokens go to `cache` when one is given."""

    def __init__(self, config: MiCoTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        if cache is not None:
            self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            key, value = self_cache.update(key, value, self.layer_idx)
        attn_output, attn_weights = _attention(
            self, query, key, value, attention_mask, self.scaling, self.config.attention_probs_dropout_prob, **kwargs
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


class MiCoTextCrossAttention(nn.Module):
    """Attention from the text to the (never masked) multimodal context; context keys/values are cached once."""

    def __init__(self, config: MiCoTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cache: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer_cache = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer_cache.keys, layer_cache.values
        else:
            kv_shape = (*encoder_hidden_states.shape[:-1], -1, self.head_dim)
            key = self.key(encoder_hidden_states).view(kv_shape).transpose(1, 2)
            value = self.value(encoder_hidden_states).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        attn_output, attn_weights = _attention(
            self, query, key, value, None, self.scaling, self.config.attention_probs_dropout_prob, **kwargs
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


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


def default_generation_config(config: MiCoConfig) -> GenerationConfig:
    """Caption decoding of the release: beam search with 3 beams, length penalty 0.6 over the hypothesis length
    including the `[CLS]` prompt (Transformers 4.31, `early_stopping=False`), `max_caption_length` new tokens,
    starting at `[CLS]`, stopping at `[SEP]`, finished rows padded with `[PAD]`."""
    text_config = config.text_config
    generation_config = GenerationConfig(
        num_beams=3,
        length_penalty=0.6,
        early_stopping=False,
        max_new_tokens=config.max_caption_length,
        bos_token_id=text_config.bos_token_id,
        decoder_start_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    generation_config.length_penalty_includes_prompt = True
    return generation_config


# --------------------------------------------------------------------------------------------------------------------
# Glue: bridges into the context, contrastive and matching heads
# --------------------------------------------------------------------------------------------------------------------


class MiCoBridge(nn.Module):
    """Linear + LayerNorm mapping a modality's tokens to the text width before they join the context."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, output_size)
        self.layer_norm = nn.LayerNorm(output_size, eps=1e-12)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dense(hidden_states))


class MiCoMatchingHead(nn.Module):
    """Linear -> exact GELU -> LayerNorm -> Linear(2): matched/unmatched logits from the first text token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.GELU()
        self.layer_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.classifier = nn.Linear(hidden_size, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer_norm(self.activation(self.dense(hidden_states))))


# --------------------------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------------------------

# `(model_class, path, *model_args, **kwargs) -> model` for checkpoints of the original research code. The package
# installs it (`modeling_mico.convert_original`) so that the model never imports conversion code; under remote code it
# stays unset and such checkpoints are refused with the advice to install the package.
original_checkpoint_loader: Callable | None = None
ORIGINAL_MODEL_TYPES = (None, "vast")  # `model_type` of an original config.json: none, or the original's "vast"


def check_local_path(name_or_path) -> str:
    """`name_or_path` with `~` expanded; raises `FileNotFoundError` at once when it can only be a local path (absolute,
    `~`, `.`, several separators, or under an existing directory like `runs/tny`) but does not exist, rather than
    letting it be tried as a Hub repository id."""
    import os

    path = os.path.expanduser(os.fspath(name_or_path))
    parts = path.replace("\\", "/").split("/")
    if not os.path.exists(path) and (
        path != os.fspath(name_or_path)
        or os.path.isabs(path)
        or path.startswith(".")
        or len(parts) > 2
        or (len(parts) == 2 and os.path.isdir(parts[0]))
    ):
        raise FileNotFoundError(f"no such directory: {name_or_path}")
    return path


def config_model_type(config_file: str) -> str | None:
    """The `model_type` of a config.json, refusing a file that is not a JSON object (the error names the file)."""
    import json

    with open(config_file, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise OSError(f"{config_file} is not a valid JSON file: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, not a {type(config).__name__}")
    return config.get("model_type")


def find_checkpoint_file(path: str, filename: str, kwargs: dict) -> str | None:
    """`filename` in a local directory or Hub repository (`None` when it has none), found with the hub options of
    `from_pretrained` `kwargs`. `kwargs["revision"]` is resolved to a commit once, in place, so that the other lookups
    of the same load are answered from the cache without asking the Hub again."""
    from transformers.utils import cached_file
    from transformers.utils.hub import resolve_revision

    kwargs["revision"] = resolve_revision(
        path,
        kwargs.get("revision"),
        token=kwargs.get("token"),
        local_files_only=kwargs.get("local_files_only", False),
        cache_dir=kwargs.get("cache_dir"),
    )
    names = ("cache_dir", "proxies", "token", "local_files_only", "subfolder", "revision")
    lookup = {name: kwargs[name] for name in names if name in kwargs}
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **lookup)


class MiCoPreTrainedModel(PreTrainedModel):
    config: MiCoConfig
    base_model_prefix = "mico"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiCoVisionEncoderLayer", "MiCoTextLayer", "MiCoVisionEmbeddings", "MiCoTextEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": [MiCoVisionEncoderLayer, MiCoTextLayer],
        "attentions": [
            OutputRecorder(MiCoVisionAttention, index=1),
            OutputRecorder(MiCoTextSelfAttention, index=1),
        ],
        "cross_attentions": OutputRecorder(MiCoTextCrossAttention, index=1),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a MiCo directory or Hub repository (a config.json of `model_type` `"mico"`). A checkpoint of the
        original research code - Hub layout `config.json` of training hyper-parameters + `mico_pytorch_model.safetensors`
        (or `.bin`), or repository layout `ckpt/model_step_<N>.pt` + `log/hps.json` - is converted on the fly when the
        `mico-transformers` package is installed.

        Telling the two apart reads config.json once, the file every load reads anyway (the revision is resolved once
        and passed on, so the Hub is asked nothing more). A local-looking path that does not exist raises
        `FileNotFoundError` at once."""
        import os

        from transformers.utils import CONFIG_NAME

        if pretrained_model_name_or_path is None or os.path.isfile(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        path = check_local_path(pretrained_model_name_or_path)
        config_file = find_checkpoint_file(path, CONFIG_NAME, kwargs)
        is_mico = config_file is not None and config_model_type(config_file) not in ORIGINAL_MODEL_TYPES
        if is_mico or (config_file is None and not os.path.isdir(path)):  # or a Hub repo without config.json
            return super().from_pretrained(path, *model_args, **kwargs)
        if original_checkpoint_loader is None:
            raise OSError(
                f"{pretrained_model_name_or_path} is not a Transformers MiCo checkpoint (config.json with model_type "
                "'mico'): it looks like a checkpoint of the original MiCo code. Install the package to convert it "
                "(`pip install mico-transformers`), on the fly or once with conversion/convert_mico_original_to_hf.py."
            )
        return original_checkpoint_loader(cls, path, *model_args, **kwargs)

    def auto_map_for_heads(self) -> dict[str, str]:
        """`auto_map` entries for the config and every MiCo class of this package registered for an Auto class, so
        that a saved directory loads with `trust_remote_code=True` into any head without this package installed."""
        package = MiCoPreTrainedModel.__module__.rpartition(".")[0]
        entries = {"AutoConfig": f"{MiCoConfig.__module__.rpartition('.')[2]}.{MiCoConfig.__name__}"}
        pending, seen = [MiCoPreTrainedModel], []
        while pending:
            seen.append(pending.pop())
            pending.extend(seen[-1].__subclasses__())
        for candidate in seen:
            auto_class = vars(candidate).get("_auto_class")
            package_of, _, module = candidate.__module__.rpartition(".")
            if auto_class and candidate.config_class is MiCoConfig and package_of == package:
                entries[auto_class] = f"{module}.{candidate.__name__}"
        return entries

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config with an `auto_map` for every head class, and the model code: the files
        Transformers' `custom_object_save` collects by following the relative imports of the model's module, which are
        only configuration and modeling modules (never conversion or processing code, see `tests/test_loading.py`)."""
        if isinstance(self.config, MiCoConfig):
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self.auto_map_for_heads()}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, MiCoVisionEmbeddings):
            init.trunc_normal_(module.class_embedding, std=std)
            init.trunc_normal_(module.position_embedding, std=std)
        elif isinstance(module, MiCoVisionAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, MiCoModel):
            for parameter in [*module.frame_embeddings.values(), *module.type_embeddings.values()]:
                init.normal_(parameter, mean=0.0, std=std)
            init.constant_(module.temperature, self.config.temperature_init_value)


class MiCoVisionModel(MiCoPreTrainedModel):
    """The EVA vision transformer shared by all knowledge modalities; returns every token after the final norm."""

    config: MiCoVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MiCoVisionEncoderLayer", "MiCoVisionEmbeddings"]

    def __init__(self, config: MiCoVisionConfig):
        super().__init__(config)
        self.embeddings = MiCoVisionEmbeddings(config)
        self.encoder = MiCoVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images (see [`MiCoImageProcessor`]).

        Returns a [`BaseModelOutputWithPooling`] whose `last_hidden_state` holds all tokens (class token first) after
        the final LayerNorm and whose `pooler_output` is the class token.
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        hidden_states = self.embeddings(pixel_values)
        hidden_states = self.encoder(hidden_states, **kwargs).last_hidden_state
        hidden_states = self.post_layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])


class MiCoTextModel(MiCoPreTrainedModel):
    """BERT with cross-attention in every layer; without `encoder_hidden_states` it is a plain text encoder."""

    config: MiCoTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)
    _no_split_modules = ["MiCoTextLayer", "MiCoTextEmbeddings"]

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
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): WordPiece ids.
        attention_mask (`torch.Tensor`, *optional*):
            `(batch_size, sequence_length)` padding mask (bidirectional attention, as for retrieval and matching), or
            `(batch_size, query_length, key_length)` explicit mask with 1 where attention is allowed (causal caption
            masks; `key_length` includes cached tokens).
        encoder_hidden_states (`torch.Tensor` of shape `(batch_size, context_length, hidden_size)`, *optional*):
            The multimodal context. Cross-attention sees every position of it.
        cache ([`Cache`], *optional*): an [`EncoderDecoderCache`] of earlier self-attention keys/values and of the
            context's cross-attention keys/values.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
        hidden_states = self.embeddings(input_ids, position_ids, token_type_ids)
        attention_mask = self._prepare_attention_mask(attention_mask, hidden_states)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(hidden_states.dtype)
        hidden_states = self.encoder(hidden_states, attention_mask, encoder_hidden_states, cache=cache, **kwargs)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)

    def _prepare_attention_mask(self, attention_mask: torch.Tensor | None, hidden_states: torch.Tensor):
        """A 2-D padding mask becomes the implementation's bidirectional mask; a 3-D mask becomes additive 4-D."""
        if attention_mask is None or attention_mask.dim() == 2:
            return create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
        if attention_mask.dim() != 3:
            raise ValueError(
                f"attention_mask must be (batch, sequence) or (batch, query, key), got shape {tuple(attention_mask.shape)}"
            )
        if self.config._attn_implementation == "flash_attention_2":
            raise ValueError("flash_attention_2 cannot take an explicit 3-D attention mask; use attn_implementation='sdpa'")
        min_value = torch.finfo(hidden_states.dtype).min
        allowed = attention_mask[:, None].to(torch.bool)
        return torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(
            ~allowed, min_value
        )


@dataclass
class MiCoOutput(ModelOutput):
    r"""
    Output of [`MiCoModel`]: L2-normalised embeddings of every input given and the text-to-modality similarities
    divided by the temperature. Extra configured modalities add `<name>_embeds` and `logits_per_text_<name>` keys.

    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised text embeddings.
    image_embeds, video_embeds, audio_embeds, depth_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        normalised modality embeddings.
    logits_per_text_image, logits_per_text_video, logits_per_text_audio, logits_per_text_depth
        (`torch.FloatTensor` of shape `(text_batch_size, batch_size)`): similarities divided by the temperature.
    temperature (`torch.FloatTensor`): the learned temperature.
    """

    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    depth_embeds: torch.FloatTensor | None = None
    logits_per_text_image: torch.FloatTensor | None = None
    logits_per_text_video: torch.FloatTensor | None = None
    logits_per_text_audio: torch.FloatTensor | None = None
    logits_per_text_depth: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPastAndCrossAttentions | None = None


class MiCoModel(MiCoPreTrainedModel):
    """
    The MiCo encoder: the shared vision tower, the cross-attention BERT, the bridges that build the multimodal
    context, the single and fused contrastive heads, the temperature and the matching head.
    """

    config: MiCoConfig
    # checkpoints of the captioning / pretraining heads also carry the language-model head
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        config.text_config.encoder_hidden_size = text_width
        self.vision_model = MiCoVisionModel._from_config(config.vision_config)
        self.text_model = MiCoTextModel._from_config(config.text_config)

        modalities = list(config.knowledge_modalities)
        self.modality_bridges = nn.ModuleDict({name: MiCoBridge(vision_width, text_width) for name in modalities})
        self.modality_bridges["subtitle"] = MiCoBridge(text_width, text_width)
        self.frame_embeddings = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(1, frames, text_width)) for name, frames in config.knowledge_modalities.items()}
        )
        self.type_embeddings = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(1, 1, text_width)) for name in [*modalities, "subtitle"]}
        )

        head_inputs = {"text": text_width, "subtitle": text_width, **dict.fromkeys(modalities, vision_width)}
        self.contrastive_heads = nn.ModuleDict(
            {name: nn.Linear(width, config.projection_dim, bias=False) for name, width in head_inputs.items()}
        )
        self.fused_heads = nn.ModuleDict(
            {
                name: nn.Linear(sum(head_inputs[part] for part in parts), config.projection_dim)
                for name, parts in config.fused_heads.items()
            }
        )
        self.temperature = nn.Parameter(torch.tensor(config.temperature_init_value))
        self.itm_head = MiCoMatchingHead(text_width)
        self.post_init()

    # ---- encoders -------------------------------------------------------------------------------------------------

    def encode_knowledge(self, modality: str, values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run the shared ViT on every frame: `(batch, frames, C, H, W)` -> `(batch, frames, tokens, width)`.

        Images may be `(batch, C, H, W)` (one frame); audio arrives as `(batch, slices, H, W)` spectrogram slices and
        is repeated to three channels.
        """
        if modality not in self.config.knowledge_modalities:
            raise ValueError(f"unknown modality {modality!r}; configured: {list(self.config.knowledge_modalities)}")
        if modality == "audio":
            if values.dim() != 4:
                raise ValueError(
                    f"input_features must be (batch, slices, height, width) spectrograms, got {tuple(values.shape)}"
                )
            values = values.unsqueeze(2).expand(-1, -1, 3, -1, -1)
        elif values.dim() == 4:
            values = values.unsqueeze(1)
        if values.dim() != 5:
            raise ValueError(f"{modality} values must be (batch, frames, channels, height, width), got {tuple(values.shape)}")
        batch_size, num_frames = values.shape[:2]
        tokens = self.vision_model(values.flatten(0, 1), **kwargs).last_hidden_state
        return tokens.view(batch_size, num_frames, *tokens.shape[1:])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Text (or subtitle) tokens from the BERT without cross-attention, with a bidirectional padding mask."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    @staticmethod
    def pool_knowledge(tokens: torch.Tensor) -> torch.Tensor:
        """Contrastive pooling: the class token of every frame, averaged over frames."""
        return tokens[:, :, 0].mean(dim=1)

    # ---- contrastive features -------------------------------------------------------------------------------------

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings `(batch, projection_dim)` (before L2 normalisation)."""
        return self.contrastive_heads["text"](self.encode_text(input_ids, attention_mask)[:, 0])

    def get_subtitle_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected subtitle embeddings (the subtitle head on the first BERT token)."""
        return self.contrastive_heads["subtitle"](self.encode_text(input_ids, attention_mask)[:, 0])

    def get_modality_features(self, modality: str, values: torch.Tensor) -> torch.Tensor:
        """Projected embeddings of any configured knowledge modality (before L2 normalisation)."""
        return self.contrastive_heads[modality](self.pool_knowledge(self.encode_knowledge(modality, values)))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings; `pixel_values` is `(batch, 3, H, W)` or `(batch, frames, 3, H, W)`."""
        return self.get_modality_features("vision", pixel_values)

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Projected video embeddings from `(batch, frames, 3, H, W)`."""
        return self.get_modality_features("vision", pixel_values_videos)

    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """Projected audio embeddings from spectrogram slices `(batch, slices, H, W)`."""
        return self.get_modality_features("audio", input_features)

    def get_depth_features(self, depth_values: torch.Tensor) -> torch.Tensor:
        """Projected depth embeddings from `(batch, frames, 3, H, W)` depth maps."""
        return self.get_modality_features("depth", depth_values)

    def get_fused_features(
        self,
        subtitle_input_ids: torch.Tensor | None = None,
        subtitle_attention_mask: torch.Tensor | None = None,
        **knowledge_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Fused-head embedding for exactly the modalities given: video+audio -> `va`, image+depth -> `id`,
        video+subtitle -> `vs`, video+audio+subtitle -> `vas` (heads come from `config.fused_heads`)."""
        pooled = {
            modality: self.pool_knowledge(self.encode_knowledge(modality, values))
            for modality, values in self._knowledge_by_modality(knowledge_inputs).items()
        }
        if subtitle_input_ids is not None:
            pooled["subtitle"] = self.encode_text(subtitle_input_ids, subtitle_attention_mask)[:, 0]
        head = self._fused_head_for(set(pooled))
        parts = self.config.fused_heads[head]
        return self.fused_heads[head](torch.cat([pooled[part] for part in parts], dim=-1))

    def _fused_head_for(self, given: set[str]) -> str:
        for name, parts in self.config.fused_heads.items():
            if set(parts) == given:
                return name
        raise ValueError(
            f"no fused head combines {sorted(given)}; configured fused heads: {dict(self.config.fused_heads)}"
        )

    # ---- multimodal context and matching --------------------------------------------------------------------------

    def context_from_tokens(self, modality: str, tokens: torch.Tensor) -> torch.Tensor:
        """Bridge ViT tokens `(batch, frames, tokens, C)` into context tokens `(batch, frames*tokens, D)`."""
        batch_size, num_frames = tokens.shape[:2]
        if self.config.pool_video:
            tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:].mean(dim=2, keepdim=True)], dim=2)
        hidden_states = self.modality_bridges[modality](tokens)
        hidden_states = hidden_states + self._frame_embedding(modality, num_frames).unsqueeze(2)
        hidden_states = hidden_states.reshape(batch_size, -1, hidden_states.shape[-1])
        return hidden_states + self.type_embeddings[modality]

    def _frame_embedding(self, modality: str, num_frames: int) -> torch.Tensor:
        """The frame table, resampled along the frame axis by nearest neighbour when the frame count differs."""
        table = self.frame_embeddings[modality]
        if table.shape[1] == num_frames:
            return table
        resized = F.interpolate(table.float().permute(0, 2, 1), size=num_frames, mode="nearest")
        return resized.permute(0, 2, 1).to(table.dtype)

    def subtitle_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Subtitle context: the bridge over all token positions (padding included) plus the type embedding."""
        return self.modality_bridges["subtitle"](self.encode_text(input_ids, attention_mask)) + self.type_embeddings[
            "subtitle"
        ]

    def get_multimodal_context(
        self,
        subtitle_input_ids: torch.Tensor | None = None,
        subtitle_attention_mask: torch.Tensor | None = None,
        **knowledge_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """The concatenated context `(batch, length, D)` of the modalities given, in the order vision, audio, depth,
        other configured modalities, subtitle. It is never masked."""
        parts = [
            self.context_from_tokens(modality, self.encode_knowledge(modality, values))
            for modality, values in self._knowledge_by_modality(knowledge_inputs).items()
        ]
        if subtitle_input_ids is not None:
            parts.append(self.subtitle_context(subtitle_input_ids, subtitle_attention_mask))
        if not parts:
            raise ValueError(f"give at least one knowledge input ({', '.join(knowledge_input_names(self.config))})")
        return torch.cat(parts, dim=1)

    def get_matching_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **context_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Matched/unmatched logits `(batch, 2)` of each caption with its context (given or built from inputs)."""
        if context is None:
            context = self.get_multimodal_context(**context_inputs)
        elif context_inputs:
            raise ValueError(f"give either `context` or knowledge inputs, not both (got {sorted(context_inputs)})")
        if context.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} captions but a context batch of {context.shape[0]}")
        hidden_states = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=context
        ).last_hidden_state
        return self.itm_head(hidden_states[:, 0])

    def get_matching_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **context_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Probability `(batch,)` that each caption matches its context: `softmax(itm_head(first token))[:, 1]`."""
        return self.get_matching_logits(input_ids, attention_mask, context, **context_inputs).softmax(dim=-1)[:, 1]

    # ---- input plumbing -------------------------------------------------------------------------------------------

    def _knowledge_by_modality(self, knowledge_inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Map model input names to modalities in context order, refusing unknown names and duplicate modalities."""
        names = knowledge_input_names(self.config)
        found: dict[str, torch.Tensor] = {}
        for input_name, values in knowledge_inputs.items():
            if values is None:
                continue
            if input_name not in names:
                raise ValueError(f"unknown input {input_name!r}; this model takes {', '.join(names)}")
            modality = names[input_name][0]
            if modality in found:
                raise ValueError(f"two inputs for the {modality} modality; give images or videos, not both")
            found[modality] = values
        order = [*CONTEXT_ORDER, *(m for m in self.config.knowledge_modalities if m not in CONTEXT_ORDER)]
        return {modality: found[modality] for modality in order if modality in found}

    def _gather_knowledge_inputs(
        self, named: dict[str, torch.Tensor | None], kwargs: dict, strict: bool = False
    ) -> dict[str, torch.Tensor | None]:
        """The named knowledge inputs plus configured extras (`<name>_values`) popped out of `kwargs`; with
        `strict`, any other keyword argument is an error."""
        names = knowledge_input_names(self.config)
        extra = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
        if strict and kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; knowledge inputs are {', '.join(names)}")
        return {**named, **extra}

    # ---- forward ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        depth_values: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MiCoOutput | tuple:
        r"""
        Contrastive embeddings of the text and of every knowledge input given, and `logits_per_text_<name>`
        similarity matrices (normalised text x normalised modality embeddings / temperature) when text is given.
        Configured extra modalities are passed as `<name>_values`.

        Example:

        ```python
        >>> import torch
        >>> from modeling_mico import MiCoConfig, MiCoModel
        >>> config = MiCoConfig(
        ...     vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        ...                        image_size=56, patch_size=14),
        ...     text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        ...                      vocab_size=1000, max_position_embeddings=64),
        ...     projection_dim=32)
        >>> model = MiCoModel(config).eval()
        >>> out = model(input_ids=torch.randint(0, 1000, (2, 8)), pixel_values_videos=torch.randn(2, 4, 3, 56, 56))
        >>> out.logits_per_text_video.shape
        torch.Size([2, 2])

        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        names = knowledge_input_names(self.config)
        inputs = self._gather_knowledge_inputs(
            {
                "pixel_values": pixel_values,
                "pixel_values_videos": pixel_values_videos,
                "input_features": input_features,
                "depth_values": depth_values,
            },
            kwargs,
            strict=True,
        )
        output = MiCoOutput()
        text_embeds = None
        if input_ids is not None:
            text_output = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
            text_embeds = F.normalize(self.contrastive_heads["text"](text_output.last_hidden_state[:, 0]), dim=-1)
            output["text_embeds"] = text_embeds
            output["text_model_output"] = text_output
        for input_name, values in inputs.items():
            if values is None:
                continue
            if input_name not in names:
                raise ValueError(f"{input_name} is not a modality of this model; it takes {', '.join(names)}")
            modality, output_name = names[input_name]
            embeds = F.normalize(self.get_modality_features(modality, values), dim=-1)
            output[f"{output_name}_embeds"] = embeds
            if text_embeds is not None:
                output[f"logits_per_text_{output_name}"] = text_embeds @ embeds.t() / self.temperature
        output["temperature"] = self.temperature
        return output if return_dict else output.to_tuple()


class MiCoModelWithLMHead(MiCoModel):
    """[`MiCoModel`] plus BERT's masked-language-model head tied to the word embeddings: the shared base of the
    captioning and pretraining heads (same weight names, so one checkpoint loads into every head class)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight"}
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        self.lm_head = MiCoLMHead(config.text_config)
        self.post_init()

    def post_init(self) -> None:
        """`MiCoModel.__init__` calls this before `lm_head` exists (nothing to tie yet): run it once, at the end."""
        if hasattr(self, "lm_head"):
            super().post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings


# --------------------------------------------------------------------------------------------------------------------
# Pretraining: omni-modal contrastive, matching and caption losses
# --------------------------------------------------------------------------------------------------------------------

# Letters of pretraining tasks: "t" is the caption, every further letter names one modality of the other side
# ("tva": caption vs. vision+audio). Extra configured knowledge modalities use their first letter ("n" for "normal").
TASK_LETTERS = {"v": "vision", "a": "audio", "d": "depth", "s": "subtitle"}

# First id drawn for randomly replaced caption tokens (ids below it are BERT's special and unused tokens).
RANDOM_TOKEN_START = 106


def task_letters(config: MiCoConfig) -> dict[str, str]:
    """Letter -> modality for the tasks of this configuration (`TASK_LETTERS` plus first letters of extras)."""
    letters = {
        letter: modality
        for letter, modality in TASK_LETTERS.items()
        if modality == "subtitle" or modality in config.knowledge_modalities
    }
    for modality in config.knowledge_modalities:
        if modality in TASK_LETTERS.values():
            continue
        letter = modality[0]
        if letter == "t" or letter in letters:
            raise ValueError(f"modality {modality!r} cannot be named in tasks: its letter {letter!r} is taken")
        letters[letter] = modality
    return letters


def parse_task(task: str, letters: dict[str, str]) -> tuple[str, ...]:
    """`"tva"` -> `("vision", "audio")`; refuses unknown or repeated letters."""
    parts = task[1:]
    if task[:1] != "t" or not parts or len(set(parts)) != len(parts) or any(c not in letters for c in parts):
        raise ValueError(
            f"task {task!r} must be 't' followed by distinct modality letters of {dict(sorted(letters.items()))}"
        )
    return tuple(letters[c] for c in parts)


def contrastive_loss(
    text_embeds: torch.Tensor, modality_embeds: torch.Tensor, temperature: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Symmetric cross-entropy of normalised embeddings against the global batch (all processes).

    Returns the loss, `logits_per_text` and `logits_per_modality` (local rows x global columns, divided by the
    temperature) and the offset of the local rows in the global batch (the positives' columns).
    """
    all_text, offset = all_gather_with_grad(text_embeds)
    all_modality, _ = all_gather_with_grad(modality_embeds)
    logits_per_text = text_embeds @ all_modality.t() / temperature
    logits_per_modality = modality_embeds @ all_text.t() / temperature
    targets = torch.arange(offset, offset + text_embeds.shape[0], device=text_embeds.device)
    loss = (
        F.cross_entropy(logits_per_modality, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, targets, label_smoothing=label_smoothing)
    ) / 2
    return loss, logits_per_text, logits_per_modality, offset


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """One column per row drawn with weights `softmax(logits) + 1e-4`, the positive (column `offset + row`) zeroed,
    so it is never drawn (duplicates of the positive elsewhere in the batch can be). Uses torch's global RNG."""
    weights = F.softmax(logits.float(), dim=1) + 1e-4
    rows = torch.arange(logits.shape[0], device=logits.device)
    weights[rows, rows + offset] = 0
    return torch.multinomial(weights, 1).squeeze(1)


@torch.no_grad()
def mask_caption_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    probability: float,
    mask_token_id: int,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask caption tokens for the caption loss, vectorised with torch's global RNG.

    Every non-padding token after position 0 (`[SEP]` included) is chosen with `probability`, conditioned on at least
    one per row, as the original's "redraw until something is chosen" loop: the first chosen token is drawn from the
    truncated geometric distribution of that condition and the tokens after it independently. A chosen token becomes
    `[MASK]` (80%), a random id in `[106, vocab_size)` (10%) or stays (10%). Returns the new ids and the labels
    (the original id at chosen positions, -100 elsewhere).
    """
    if not 0 < probability <= 1:
        raise ValueError(f"the caption mask probability must be in (0, 1], got {probability}")
    eligible = attention_mask.bool().clone()
    eligible[:, 0] = False
    rank = eligible.long().cumsum(dim=1)  # 1-based rank of each eligible token in its row
    count = rank[:, -1:]
    if probability < 1:
        # inverse CDF of P(first = k | at least one) = p (1-p)^(k-1) / (1 - (1-p)^count), k = 1..count
        keep = torch.tensor(1 - probability, dtype=torch.float64, device=input_ids.device)
        uniform = torch.rand(count.shape, dtype=torch.float64, device=input_ids.device)
        first = torch.ceil(torch.log1p(-uniform * (1 - keep**count)) / torch.log(keep)).long().clamp(min=1)
        first = torch.minimum(first, count)
        later = torch.rand(input_ids.shape, device=input_ids.device) < probability
        chosen = eligible & ((rank == first) | ((rank > first) & later))
    else:
        chosen = eligible
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, device=input_ids.device)
    low = RANDOM_TOKEN_START if vocab_size > RANDOM_TOKEN_START else 0
    random_ids = torch.randint(low, vocab_size, input_ids.shape, device=input_ids.device, dtype=input_ids.dtype)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def causal_caption_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch, seq, seq)` mask: query i sees the non-padding keys j <= i."""
    seq_len = attention_mask.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None] & attention_mask.bool()[:, None, :]).long()


@dataclass
class MiCoForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`MiCoForPreTraining`].

    loss (`torch.FloatTensor`): `contrastive_loss + matching_loss + caption_loss` (the terms that ran).
    contrastive_loss (`torch.FloatTensor`): mean over contrastive tasks of the symmetric, label-smoothed
        cross-entropy against the global batch.
    matching_loss (`torch.FloatTensor`): mean over matching tasks of `itm_loss_weight` x the matching cross-entropy.
    caption_loss (`torch.FloatTensor`): mean over caption tasks of the cross-entropy on the masked caption tokens.
    task_losses (`dict[str, torch.FloatTensor]`): every task's term, keyed `contrastive_<task>`, `matching_<task>`
        (weighted) and `caption_<task>`, e.g. `contrastive_tva`.
    logits_per_text, logits_per_modality (`dict[str, torch.FloatTensor]`): per contrastive (and matching) task, the
        `(local_batch, global_batch)` similarities divided by the temperature; local row i's positive is column
        `offset + i`.
    matching_logits (`dict[str, torch.FloatTensor]`): per matching task, `(3 * batch, 2)` logits of the positive
        pairs, the pairs (text, hard-negative context) and the pairs (hard-negative text, context), in that order.
    caption_logits (`dict[str, torch.FloatTensor]`): per caption task, `(num_masked, vocab_size)` prediction scores at
        the masked positions (`caption_labels != -100`, row-major).
    caption_input_ids, caption_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the masked
        caption shared by all caption tasks and its labels (-100 where not masked).
    temperature (`torch.FloatTensor`): the learned temperature.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    matching_loss: torch.FloatTensor | None = None
    caption_loss: torch.FloatTensor | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    logits_per_text: dict[str, torch.FloatTensor] | None = None
    logits_per_modality: dict[str, torch.FloatTensor] | None = None
    matching_logits: dict[str, torch.FloatTensor] | None = None
    caption_logits: dict[str, torch.FloatTensor] | None = None
    caption_input_ids: torch.LongTensor | None = None
    caption_labels: torch.LongTensor | None = None
    temperature: torch.FloatTensor | None = None


class MiCoForPreTraining(MiCoModelWithLMHead):
    r"""
    MiCo with its three pretraining losses (omni-modal contrastive, matching with hard negatives, masked caption
    generation), on top of [`MiCoModel`] (same weight names) plus the language-model head tied to the word embeddings.

    Which tasks run is configuration: `config.contrastive_tasks`, `matching_tasks` and `caption_tasks` list tasks
    such as `"tv"` (caption vs. vision: image or video), `"ta"` (audio), `"td"` (depth), `"ts"` (subtitle), `"tva"`
    (vision+audio through the fused `va` head for contrastive, the concatenated context for matching and captions),
    `"tn"` for an extra `normal` modality (see `TASK_LETTERS`). Tasks whose inputs are absent from the batch (of any
    process) are skipped. Every encoder runs once per batch: the ViT tokens feed both the pooled contrastive features
    and the multimodal context. Negatives of the contrastive and matching losses come from all processes.

    Hard negatives and caption masks are drawn from torch's global RNG (no `torch.Generator`), so seeding (`set_seed`,
    which `Trainer` calls on every process) makes a run reproducible; processes seeded alike draw the same mask
    *pattern* for their different captions, as in the original.
    """

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        letters = task_letters(config)
        self.tasks = {
            kind: {task: parse_task(task, letters) for task in getattr(config, f"{kind}_tasks")}
            for kind in ("contrastive", "matching", "caption")
        }
        for modalities in [*self.tasks["contrastive"].values(), *self.tasks["matching"].values()]:
            if len(modalities) > 1:
                self._fused_head_for(set(modalities))  # raises when no fused head combines them

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        depth_values: torch.Tensor | None = None,
        subtitle_input_ids: torch.LongTensor | None = None,
        subtitle_attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MiCoForPreTrainingOutput | tuple:
        r"""
        input_ids, attention_mask: the captions (`[CLS] ... [SEP]`, padded).
        subtitle_input_ids, subtitle_attention_mask: subtitles (the `s` modality), optional.
        return_loss (`bool`, defaults to `True`): with `False` only the contrastive similarities are computed (no
            losses, no random draws).

        Knowledge inputs as for [`MiCoModel`] (`<name>_values` for configured extras).

        Example:

        ```python
        >>> import torch
        >>> from modeling_mico import MiCoConfig, MiCoForPreTraining
        >>> config = MiCoConfig(
        ...     vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        ...                        image_size=56, patch_size=14),
        ...     text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        ...                      max_position_embeddings=64),
        ...     projection_dim=32)
        >>> model = MiCoForPreTraining(config)
        >>> ids = torch.randint(1000, 2000, (4, 12))
        >>> out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(4, 3, 56, 56))
        >>> sorted(out.task_losses)
        ['caption_tv', 'contrastive_tv', 'matching_tv']

        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        named = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "input_features": input_features,
            "depth_values": depth_values,
        }
        knowledge = self._knowledge_by_modality(self._gather_knowledge_inputs(named, kwargs, strict=True))
        kinds = ("contrastive",) if not return_loss else ("contrastive", "matching", "caption")
        tasks = self._runnable_tasks(kinds, set(knowledge) | ({"subtitle"} if subtitle_input_ids is not None else set()))

        # every encoder runs once; pooled features and contexts are derived from the same tokens
        needed = {modality for kind in tasks.values() for modalities in kind.values() for modality in modalities}
        tokens = {modality: self.encode_knowledge(modality, knowledge[modality]) for modality in knowledge if modality in needed}
        pooled = {modality: self.pool_knowledge(value) for modality, value in tokens.items()}
        contexts: dict[str, torch.Tensor] = {}
        if "subtitle" in needed:
            subtitle_hidden = self.encode_text(subtitle_input_ids, subtitle_attention_mask)
            pooled["subtitle"] = subtitle_hidden[:, 0]
            contexts["subtitle"] = self.modality_bridges["subtitle"](subtitle_hidden) + self.type_embeddings["subtitle"]
        text_embeds = F.normalize(self.contrastive_heads["text"](self.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

        def context_of(modalities: tuple[str, ...]) -> torch.Tensor:
            for modality in modalities:
                if modality not in contexts:
                    contexts[modality] = self.context_from_tokens(modality, tokens[modality])
            order = [*tokens, "subtitle"]  # tokens follow the context order of `_knowledge_by_modality`
            return torch.cat([contexts[modality] for modality in order if modality in modalities], dim=1)

        output = MiCoForPreTrainingOutput(
            task_losses={}, logits_per_text={}, logits_per_modality={}, temperature=self.temperature
        )
        # similarities of contrastive tasks, and of matching tasks (their hard negatives are drawn from them)
        similarity: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        contrastive_terms = []
        for task, modalities in {**tasks.get("matching", {}), **tasks["contrastive"]}.items():
            modality_embeds = F.normalize(self._pooled_embeds(modalities, pooled), dim=-1)
            loss, logits_per_text, logits_per_modality, offset = contrastive_loss(
                text_embeds, modality_embeds, self.temperature, self.config.label_smoothing
            )
            similarity[task] = (logits_per_text, logits_per_modality, offset)
            output.logits_per_text[task] = logits_per_text
            output.logits_per_modality[task] = logits_per_modality
            if task in tasks["contrastive"]:
                output.task_losses[f"contrastive_{task}"] = loss
                contrastive_terms.append(loss)
        if contrastive_terms:
            output.contrastive_loss = torch.stack(contrastive_terms).mean()

        if return_loss:
            matching_terms = []
            for task, modalities in tasks["matching"].items():
                logits_per_text, logits_per_modality, offset = similarity[task]
                if logits_per_text.shape[1] < 2:
                    logger.warning_once("matching loss skipped: hard negatives need at least 2 samples in the batch")
                    continue
                logits = self._matching_logits(
                    input_ids, attention_mask, context_of(modalities), logits_per_text, logits_per_modality, offset
                )
                labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
                labels[: input_ids.shape[0]] = 1
                loss = self.config.itm_loss_weight * F.cross_entropy(logits, labels)
                output.matching_logits = {**(output.matching_logits or {}), task: logits}
                output.task_losses[f"matching_{task}"] = loss
                matching_terms.append(loss)
            if matching_terms:
                output.matching_loss = torch.stack(matching_terms).mean()

            if tasks["caption"]:
                text_config = self.config.text_config
                masked_ids, labels = mask_caption_tokens(
                    input_ids,
                    attention_mask,
                    self.config.caption_mask_probability,
                    text_config.mask_token_id,
                    text_config.vocab_size,
                )
                causal_mask = causal_caption_mask(attention_mask)
                selected = labels != -100
                output.caption_input_ids, output.caption_labels, output.caption_logits = masked_ids, labels, {}
                caption_terms = []
                for task, modalities in tasks["caption"].items():
                    hidden_states = self.text_model(
                        input_ids=masked_ids, attention_mask=causal_mask, encoder_hidden_states=context_of(modalities)
                    ).last_hidden_state
                    logits = self.lm_head(hidden_states[selected])
                    loss = F.cross_entropy(logits.float(), labels[selected])
                    output.caption_logits[task] = logits
                    output.task_losses[f"caption_{task}"] = loss
                    caption_terms.append(loss)
                output.caption_loss = torch.stack(caption_terms).mean()

            terms = [output.contrastive_loss, output.matching_loss, output.caption_loss]
            output.loss = sum(term for term in terms if term is not None)
        return output if return_dict else output.to_tuple()

    def _runnable_tasks(self, kinds: tuple[str, ...], given: set[str]) -> dict[str, dict[str, tuple[str, ...]]]:
        """The configured tasks whose modalities are in this batch on every process; raises when none is."""
        used = sorted({modality for kind in kinds for modalities in self.tasks[kind].values() for modality in modalities})
        present = present_everywhere({modality: modality in given for modality in used}, self.temperature.device)
        tasks = {
            kind: {task: mods for task, mods in self.tasks[kind].items() if all(present[m] for m in mods)}
            for kind in kinds
        }
        if not any(tasks.values()):
            configured = {kind: list(self.tasks[kind]) for kind in kinds}
            raise ValueError(
                f"no pretraining task can run on this batch: it carries {sorted(given) or 'no modality'} (on every "
                f"process), the configured tasks are {configured}"
            )
        return tasks

    def _pooled_embeds(self, modalities: tuple[str, ...], pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected (not yet normalised) features of one modality or, through its fused head, of several."""
        if len(modalities) == 1:
            return self.contrastive_heads[modalities[0]](pooled[modalities[0]])
        head = self._fused_head_for(set(modalities))
        return self.fused_heads[head](torch.cat([pooled[part] for part in self.config.fused_heads[head]], dim=-1))

    def _matching_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        context: torch.Tensor,
        logits_per_text: torch.Tensor,
        logits_per_modality: torch.Tensor,
        offset: int,
    ) -> torch.Tensor:
        """Matching logits of the positives, then (text, hard-negative context), then (hard-negative text, context)."""
        negative_contexts = sample_hard_negatives(logits_per_text, offset)
        negative_texts = sample_hard_negatives(logits_per_modality, offset)
        all_contexts, _ = all_gather_with_grad(context)
        all_ids = all_gather_no_grad(input_ids)
        all_masks = all_gather_no_grad(attention_mask)
        return self.get_matching_logits(
            torch.cat([input_ids, input_ids, all_ids[negative_texts]]),
            torch.cat([attention_mask, attention_mask, all_masks[negative_texts]]),
            context=torch.cat([context, all_contexts[negative_contexts], context]),
        )


# --------------------------------------------------------------------------------------------------------------------
# Caption generation
# --------------------------------------------------------------------------------------------------------------------


def caption_attention_mask(padding_mask: torch.Tensor, query_length: int, prefix_length: int = 0) -> torch.Tensor:
    """`(batch, query_length, key_length)` mask of the caption decoder, 1 where attention is allowed.

    The queries are the last `query_length` of the `key_length` positions (earlier ones are cached). Query `i` sees the
    non-padding keys `j <= i` (causal), and the first `prefix_length` positions (a question) also see each other
    bidirectionally but never what follows them, as in the original's captioning and question answering.
    """
    key_length = padding_mask.shape[1]
    key_positions = torch.arange(key_length, device=padding_mask.device)
    query_positions = key_positions[key_length - query_length :]
    visible = key_positions[None, :] <= query_positions.clamp(min=prefix_length - 1)[:, None]
    return visible[None] & padding_mask.bool()[:, None, :]


@dataclass
class _ReleaseBeamScoring:
    """Per-call state of a beam search scored like Transformers 4.31 (see `MiCoForConditionalGeneration`)."""

    eos_token_ids: torch.Tensor | None
    best_candidate_scores: torch.Tensor | None = None

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eos_token_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos_token_ids.to(tokens.device))


class MiCoForConditionalGeneration(MiCoModelWithLMHead, GenerationMixin):
    r"""
    MiCo captioning and question answering: [`MiCoModel`] (same weight names) plus the language-model head tied to the
    word embeddings, decoded with Transformers' `generate` (greedy, beam search, sampling, streamers, ...).

    Decoding follows the original "append a `[MASK]`" scheme: the text starts at `[CLS]`, and the distribution of the
    next token is read at a `[MASK]` appended after the tokens so far, under a causal mask and with cross-attention to
    the multimodal context of whatever knowledge inputs are given (built once per call). The keys/values of the real
    tokens are cached (the `[MASK]` never is), which gives the same tokens as the original's full recomputation
    (`use_cache=False`) much faster. Beam search scores finished hypotheses as the release did (Transformers 4.31:
    length penalty over the length *including* the prompt); `length_penalty_includes_prompt=False` selects the rule of
    current Transformers (generated tokens only).

    Example:

    ```python
    >>> import torch
    >>> from modeling_mico import MiCoConfig, MiCoForConditionalGeneration
    >>> config = MiCoConfig(
    ...     vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                        image_size=56, patch_size=14),
    ...     text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      max_position_embeddings=64),
    ...     projection_dim=32)
    >>> model = MiCoForConditionalGeneration(config).eval()
    >>> ids = model.generate(pixel_values_videos=torch.randn(2, 4, 3, 56, 56), max_new_tokens=5)
    >>> ids[:, 0].tolist()  # every caption starts at [CLS]
    [101, 101]

    ```
    """

    _release_beam_scoring: _ReleaseBeamScoring | None = None

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        self.generation_config = default_generation_config(config)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        depth_values: torch.Tensor | None = None,
        subtitle_input_ids: torch.LongTensor | None = None,
        subtitle_attention_mask: torch.Tensor | None = None,
        prefix_length: int = 0,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions | tuple:
        r"""
        Language-model logits of every text position under the caption mask (see [`caption_attention_mask`]) with
        cross-attention to the multimodal context. Positions are the plain index `0..n` (cached tokens included).

        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Text ids; to read the next-token distribution, end them with `[MASK]` (what `generate` does).
        attention_mask (`torch.Tensor`, *optional*):
            `(batch_size, past_length + sequence_length)` padding mask, turned into the caption mask, or an explicit
            `(batch_size, sequence_length, past_length + sequence_length)` mask (1 = may attend).
        context (`torch.Tensor` of shape `(batch_size, context_length, hidden_size)`, *optional*):
            A multimodal context from [`~MiCoModel.get_multimodal_context`]; otherwise it is built from the knowledge
            inputs (`pixel_values`, `pixel_values_videos`, `input_features`, `depth_values`, `<name>_values` for
            configured extra modalities, `subtitle_input_ids`).
        prefix_length (`int`, *optional*, defaults to 0):
            Number of leading positions read bidirectionally (a question), as in the original question answering.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids *at* each position (not shifted: MiCo predicts a token where a `[MASK]` stands), -100 where no
            loss is taken: the original caption loss is the cross-entropy on the masked caption tokens.
        cache ([`Cache`], *optional*): keys/values of earlier tokens and of the context (an [`EncoderDecoderCache`];
            a [`DynamicCache`] is taken as its self-attention part).
        logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
            Compute logits for the last `logits_to_keep` positions only (0 = all), or for the given indices.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        named = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "input_features": input_features,
            "depth_values": depth_values,
        }
        knowledge = self._gather_knowledge_inputs(named, kwargs)
        context = self._resolve_context(context, subtitle_input_ids, subtitle_attention_mask, knowledge)

        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config.text_config), DynamicCache())
        elif isinstance(cache, DynamicCache):
            cache = EncoderDecoderCache(cache, DynamicCache())
        if attention_mask is None or attention_mask.dim() == 2:
            past_length = cache.get_seq_length() if cache is not None else 0
            if attention_mask is None:
                attention_mask = input_ids.new_ones(input_ids.shape[0], past_length + input_ids.shape[1])
            attention_mask = caption_attention_mask(attention_mask, input_ids.shape[1], prefix_length)

        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=context, cache=cache, **kwargs
        )
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, positions])

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=-100)
        output = CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            cache=cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    def _resolve_context(
        self,
        context: torch.Tensor | None,
        subtitle_input_ids: torch.Tensor | None,
        subtitle_attention_mask: torch.Tensor | None,
        knowledge: dict[str, torch.Tensor | None],
    ) -> torch.Tensor:
        """The given context, or the one built from the knowledge inputs (exactly one of the two)."""
        given = sorted(key for key, value in knowledge.items() if value is not None)
        if context is None:
            return self.get_multimodal_context(subtitle_input_ids, subtitle_attention_mask, **knowledge)
        if given or subtitle_input_ids is not None:
            raise ValueError(f"give either `context` or knowledge inputs, not both (got {given or ['subtitle_input_ids']})")
        return context

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        depth_values: torch.Tensor | None = None,
        subtitle_input_ids: torch.LongTensor | None = None,
        subtitle_attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | ModelOutput:
        r"""
        Caption (or answer about) the knowledge inputs given, in any combination; the multimodal context is built once.

        input_ids (`torch.LongTensor` of shape `(batch_size, prefix_length)`, *optional*):
            A text prefix read bidirectionally, e.g. a tokenized question (padded to a fixed length as in the original,
            which also fixes the answer's positions); the answer is decoded after it, starting at `[CLS]`.
        attention_mask (`torch.Tensor` of shape `(batch_size, prefix_length)`, *optional*): padding of `input_ids`.
        context (`torch.Tensor`, *optional*): a precomputed multimodal context instead of the knowledge inputs.
        generate_kwargs: anything [`~GenerationMixin.generate`] takes (`num_beams`, `do_sample`, `max_new_tokens`,
            `num_return_sequences`, `streamer`, `stopping_criteria`, ...), plus `length_penalty_includes_prompt`
            (default `True`, the release's beam scoring). Defaults come from `model.generation_config`.

        Returns the ids of the prefix, `[CLS]` and the generated tokens (`[PAD]` after `[SEP]`), or a
        [`~generation.GenerateOutput`] with `return_dict_in_generate=True`.
        """
        named = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "input_features": input_features,
            "depth_values": depth_values,
        }
        knowledge = self._gather_knowledge_inputs(named, generate_kwargs)
        context = self._resolve_context(context, subtitle_input_ids, subtitle_attention_mask, knowledge)
        batch_size = context.shape[0]
        generation_config = generate_kwargs.get("generation_config") or self.generation_config
        bos_token_id = generate_kwargs.get("bos_token_id", generation_config.bos_token_id)
        if bos_token_id is None:
            bos_token_id = self.config.text_config.bos_token_id
        start = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=context.device)

        prefix_length = 0
        if input_ids is None:
            input_ids = start
        else:
            if input_ids.shape[0] != batch_size:
                raise ValueError(f"{input_ids.shape[0]} text prefixes for a context batch of {batch_size}")
            prefix_length = input_ids.shape[1]
            input_ids = torch.cat([input_ids.to(start.device), start], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.to(start.device), torch.ones_like(start)], dim=1)
        return super().generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            context=context,
            prefix_length=prefix_length,
            **generate_kwargs,
        )

    # ---- hooks of GenerationMixin -----------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """The tokens not cached yet followed by the `[MASK]` whose logits give the next token."""
        past_length = cache.get_seq_length() if cache is not None else 0
        probe = input_ids.new_full((input_ids.shape[0], 1), self.config.text_config.mask_token_id)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        return {
            "input_ids": torch.cat([input_ids[:, past_length:], probe], dim=-1),
            "attention_mask": attention_mask,
            "cache": cache,
            **kwargs,
        }

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        """Drop the `[MASK]` from the self-attention cache: only real tokens are kept."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            cache.crop(-1)
        return model_kwargs

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs) -> tuple:
        """Accept `length_penalty_includes_prompt` as a `generate` argument even when the loaded generation config
        does not carry it."""
        includes_prompt = kwargs.pop("length_penalty_includes_prompt", None)
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if includes_prompt is not None:
            generation_config.length_penalty_includes_prompt = includes_prompt
        return generation_config, model_kwargs

    def _beam_search(self, input_ids: torch.LongTensor, *args, generation_config: GenerationConfig, **kwargs):
        """Transformers' beam search with the release's scoring (unless `length_penalty_includes_prompt=False`);
        rows finished early are padded with `pad_token_id`."""
        if getattr(generation_config, "length_penalty_includes_prompt", True):
            self._release_beam_scoring = _ReleaseBeamScoring(generation_config._eos_token_tensor)
        try:
            output = super()._beam_search(input_ids, *args, generation_config=generation_config, **kwargs)
        finally:
            self._release_beam_scoring = None
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        eos, pad = generation_config._eos_token_tensor, generation_config._pad_token_tensor
        if eos is not None and pad is not None:
            generated = sequences[:, input_ids.shape[1] :]
            is_eos = torch.isin(generated, eos.to(generated.device))
            generated.masked_fill_((is_eos.cumsum(dim=-1) - is_eos.long()) > 0, pad.item())
        if not isinstance(output, torch.Tensor) and output.sequences_scores is not None:
            output.sequences_scores = output.sequences_scores.float()
        return output

    def _update_finished_beams(
        self,
        sequences: torch.Tensor,
        topk_running_sequences: torch.Tensor,
        beam_scores: torch.Tensor,
        topk_log_probs: torch.Tensor,
        beam_indices: torch.Tensor,
        topk_running_beam_indices: torch.Tensor,
        is_early_stop_heuristic_unsatisfied: torch.Tensor,
        is_sent_finished: torch.Tensor,
        next_token_hits_stopping_criteria: torch.Tensor,
        top_num_beam_mask: torch.Tensor,
        num_beams: int,
        cur_len: int,
        decoder_prompt_len: int,
        length_penalty: float,
        early_stopping: bool | str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transformers 4.31's hypotheses: one ending in `[SEP]` scores `sum_logprobs / len ** length_penalty` with
        `len` counting the prompt and not the `[SEP]`; at the length limit the `num_beams` best running beams are
        finished over their full length. Scores are compared in float64, as 4.31 did in Python."""
        scoring = self._release_beam_scoring
        if scoring is None:
            return super()._update_finished_beams(
                sequences=sequences,
                topk_running_sequences=topk_running_sequences,
                beam_scores=beam_scores,
                topk_log_probs=topk_log_probs,
                beam_indices=beam_indices,
                topk_running_beam_indices=topk_running_beam_indices,
                is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
                is_sent_finished=is_sent_finished,
                next_token_hits_stopping_criteria=next_token_hits_stopping_criteria,
                top_num_beam_mask=top_num_beam_mask,
                num_beams=num_beams,
                cur_len=cur_len,
                decoder_prompt_len=decoder_prompt_len,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
            )
        is_eos = scoring.is_eos(topk_running_sequences[:, :, cur_len])
        if cur_len + 1 >= sequences.shape[-1]:
            running = ~is_eos & (torch.cumsum(~is_eos, dim=-1) <= num_beams)
            finished = (is_eos & top_num_beam_mask) | running
        else:
            finished = next_token_hits_stopping_criteria & top_num_beam_mask
        finished = finished & is_early_stop_heuristic_unsatisfied
        if early_stopping is True:
            finished = finished & ~is_sent_finished.all(dim=-1, keepdim=True)
        denominators = torch.where(is_eos, float(cur_len) ** length_penalty, float(cur_len + 1) ** length_penalty)
        scores = torch.where(finished, topk_log_probs.double() / denominators.double(), -1.0e9)
        scoring.best_candidate_scores = topk_log_probs[:, :1].double()

        merged_scores = torch.cat((beam_scores.double(), scores), dim=1)
        keep = torch.topk(merged_scores, k=num_beams)[1]
        return (
            self._gather_beams(torch.cat((sequences, topk_running_sequences), dim=1), keep),
            self._gather_beams(merged_scores, keep),
            self._gather_beams(torch.cat((beam_indices, topk_running_beam_indices), dim=1), keep),
            self._gather_beams(torch.cat((is_sent_finished, finished), dim=1), keep),
        )

    def _check_early_stop_heuristic(
        self,
        is_early_stop_heuristic_unsatisfied: torch.Tensor,
        running_beam_scores: torch.Tensor,
        beam_scores: torch.Tensor,
        is_sent_finished: torch.Tensor,
        cur_len: int,
        max_length: int,
        decoder_prompt_len: int,
        early_stopping: bool | str,
        length_penalty: float,
    ) -> torch.Tensor:
        """Transformers 4.31's `BeamHypotheses.is_done`: with `num_beams` finished hypotheses, stop when the worst of
        them beats the step's best candidate over the current length (prompt included)."""
        scoring = self._release_beam_scoring
        if scoring is None:
            return super()._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
                running_beam_scores=running_beam_scores,
                beam_scores=beam_scores,
                is_sent_finished=is_sent_finished,
                cur_len=cur_len,
                max_length=max_length,
                decoder_prompt_len=decoder_prompt_len,
                early_stopping=early_stopping,
                length_penalty=length_penalty,
            )
        length = max_length if early_stopping == "never" and length_penalty > 0.0 else cur_len
        best_possible = scoring.best_candidate_scores / float(length) ** length_penalty
        worst_finished = beam_scores.min(dim=-1, keepdim=True)[0]
        done = is_sent_finished.all(dim=-1, keepdim=True) & ((early_stopping is True) | (worst_finished >= best_possible))
        return is_early_stop_heuristic_unsatisfied & ~done


__all__ = [
    "MiCoForConditionalGeneration",
    "MiCoForPreTraining",
    "MiCoForPreTrainingOutput",
    "MiCoModel",
    "MiCoPreTrainedModel",
    "MiCoTextModel",
    "MiCoVisionModel",
]
