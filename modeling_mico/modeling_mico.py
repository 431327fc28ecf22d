"""PyTorch MiCo: one EVA vision transformer for every knowledge modality and a cross-attention BERT for language.

`MiCoModel` holds the towers and the glue (bridges into the multimodal context, contrastive and matching heads) and
exposes the projection API; the head classes compose it (`self.mico`) with the language-model head.
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
    CausalLMOutputWithCrossAttentions,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mico import (
    BUILTIN_MODALITIES,
    SUBTITLE,
    TASK_KINDS,
    MiCoConfig,
    MiCoVisionConfig,
    ModalitySpec,
)
from .decoding_kernels import decoding_kernels_available
from .distributed import all_gather_no_grad, all_gather_with_grad, present_everywhere
from .generation_mico import MiCoGenerationMixin, default_generation_config
from .modeling_mico_text import (
    MiCoLMHead,
    MiCoTextCrossAttention,
    MiCoTextLayer,
    MiCoTextModel,
    MiCoTextSelfAttention,
    eager_attention_forward,
    fused_projections,
    release_decoding_weights,
)
from .pretraining_mico import contrastive_loss, mask_caption_tokens, sample_hard_negatives


logger = logging.get_logger(__name__)

# Keyword arguments that reach the towers (output_attentions, output_hidden_states, attention-kernel arguments).
TOWER_KWARGS = frozenset(TransformersKwargs.__annotations__)
# Model inputs of the built-in modalities: recognised (and refused by name) even where a configuration lacks them.
BUILTIN_INPUT_NAMES = frozenset(spec.input_name for spec in BUILTIN_MODALITIES.values())


class MiCoModalityKwargs(TransformersKwargs, total=False):
    r"""
    The modality inputs, as keyword arguments of every MiCo model (`forward`, `generate`, the feature methods): the
    model inputs of the built-in registry modalities below, and `<name>_values` of configured extra modalities
    (`normal_values`, `thermal_values`, ...) likewise; an input the configuration does not have is refused by name.
    Transformers' keyword arguments (`output_attentions`, `output_hidden_states`) reach the towers where a method
    returns their outputs.

    pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
        Images (or `(batch_size, frames, 3, height, width)`), as [`MiCoImageProcessor`] prepares them.
    pixel_values_videos (`torch.FloatTensor` of shape `(batch_size, frames, 3, height, width)`):
        Video frames, as [`MiCoVideoProcessor`] prepares them.
    input_features (`torch.FloatTensor` of shape `(batch_size, slices, height, width)`):
        Audio: fbank spectrogram slices, as [`MiCoFeatureExtractor`] prepares them.
    depth_values (`torch.FloatTensor` of shape `(batch_size, frames, 3, height, width)`):
        Depth maps, as [`MiCoProcessor`] prepares them.
    normal_values (`torch.FloatTensor` of shape `(batch_size, frames, 3, height, width)`):
        Surface-normal maps (a built-in modality that configurations enable with a `normal` knowledge modality).
    """

    pixel_values: torch.FloatTensor
    pixel_values_videos: torch.FloatTensor
    input_features: torch.FloatTensor
    depth_values: torch.FloatTensor
    normal_values: torch.FloatTensor


class MiCoContextKwargs(MiCoModalityKwargs, total=False):
    r"""
    [`MiCoModalityKwargs`] plus the subtitle, the text modality that only enters the multimodal context and the fused
    heads (letter `s` in task names).

    subtitle_input_ids (`torch.LongTensor` of shape `(batch_size, subtitle_length)`):
        Tokenized subtitles.
    subtitle_attention_mask (`torch.Tensor` of shape `(batch_size, subtitle_length)`):
        Their padding mask.
    """

    subtitle_input_ids: torch.LongTensor
    subtitle_attention_mask: torch.Tensor


def pop_subtitle(kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`subtitle_input_ids` and `subtitle_attention_mask` taken out of `kwargs` (`None` when not given)."""
    return kwargs.pop("subtitle_input_ids", None), kwargs.pop("subtitle_attention_mask", None)


def check_batch_sizes(inputs: Mapping[str, torch.Tensor | None]) -> None:
    """Refuse inputs of one call (keyed by argument name) whose batch sizes differ, naming each."""
    sizes = {name: value.shape[0] for name, value in inputs.items() if value is not None and value.dim() > 0}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"the inputs have different batch sizes ({listed}); give every input one row per sample")


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
        # the dispatch stands in this module: Transformers reads it here to allow `set_attn_implementation`
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
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
    # Callables `(model, save_directory)` that `save_pretrained` runs once the model is written: `import
    # modeling_mico` adds the files of its ecosystem integrations (pipelines, sentence-transformers); remote code
    # adds none.
    save_hooks: list = []
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
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and kwargs.get("save_config", True):
            for hook in self.save_hooks:
                hook(self, save_directory)
        return result

    def _init_weights(self, module: nn.Module) -> None:
        """Transformers' initialisation (normal linear/conv/embedding weights, unit LayerNorms) plus MiCo's own
        parameters: class and position embeddings, EVA's query/value biases, frame/type tables and temperature."""
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", 0.02)
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
    r"""
    The EVA vision transformer shared by all knowledge modalities; returns every token after the final LayerNorm.

    Example:

    ```python
    >>> import torch
    >>> from modeling_mico import MiCoConfig, MiCoVisionModel

    >>> model = MiCoVisionModel(MiCoConfig.from_preset("tiny").vision_config)  # 64 px images, 16 px patches
    >>> model(torch.randn(1, 3, 64, 64)).last_hidden_state.shape
    torch.Size([1, 17, 64])

    ```
    """

    config: MiCoVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MiCoVisionEncoderLayer", "MiCoVisionEmbeddings"]
    _can_compile_fullgraph = True  # tests/test_performance.py::test_towers_compile_with_fullgraph

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
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images (see [`MiCoImageProcessor`]).

        Returns:
            [`BaseModelOutputWithPooling`]: `last_hidden_state` holds all tokens (class token first) after the final
            LayerNorm, `pooler_output` the class token.
        """
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        hidden_states = self.embeddings(pixel_values)
        hidden_states = self.encoder(hidden_states, **kwargs).last_hidden_state
        hidden_states = self.post_layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])


@dataclass
class MiCoOutput(ModelOutput):
    r"""
    Output of [`MiCoModel`]: L2-normalised embeddings of every input given and the text-to-modality similarities
    divided by the temperature. Every modality is named as in the registry (`config.modality_specs`): configured
    extras such as `thermal` add `thermal_embeds` and `logits_per_text_thermal` keys.

    Args:
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Normalised text embeddings.
        image_embeds, video_embeds, audio_embeds, depth_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Normalised modality embeddings.
        logits_per_text_image, logits_per_text_video, logits_per_text_audio, logits_per_text_depth (`torch.FloatTensor` of shape `(text_batch_size, batch_size)`):
            Similarities divided by the temperature.
        logits_per_image, logits_per_video, logits_per_audio, logits_per_depth (`torch.FloatTensor` of shape `(batch_size, text_batch_size)`):
            The transposed `logits_per_text_<name>` (Transformers' zero-shot convention, as CLIP's `logits_per_image`
            and CLAP's `logits_per_audio`): a softmax over the last dimension scores the texts as labels.
        temperature (`torch.FloatTensor`):
            The learned temperature.
        text_model_output ([`BaseModelOutputWithPastAndCrossAttentions`]):
            The text tower's output (`hidden_states` / `attentions` with `output_hidden_states` / `output_attentions`).
        modality_model_outputs (`dict[str, BaseModelOutputWithPooling]`):
            Per modality given, the output of [`~MiCoModel.get_modality_features`] (the vision tower's tokens, states
            and attentions over `batch_size * frames` images, and the projected embedding).
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
    logits_per_image: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    logits_per_audio: torch.FloatTensor | None = None
    logits_per_depth: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPastAndCrossAttentions | None = None
    modality_model_outputs: dict[str, BaseModelOutputWithPooling] | None = None


class MiCoModel(MiCoPreTrainedModel):
    r"""
    The MiCo encoder: the shared vision tower, the cross-attention BERT, the bridges that build the multimodal
    context, the single and fused contrastive heads, the temperature and the matching head.

    Every method takes the model inputs named by the modality registry (`config.modality_specs`): `pixel_values`
    (image), `pixel_values_videos` (video), `input_features` (audio), `depth_values` (depth) and `<name>_values` for
    configured extras (`normal_values`, `thermal_values`, ...); an input this configuration does not have is refused
    by name. The projection API (`encode_modality`, `pool_tokens`, `encode_text`, `project`, `fused_head_for`,
    `context_from_tokens`) is what [`MiCoForPreTraining`] and evaluation build on.

    The `get_*_features` methods return a [`BaseModelOutputWithPooling`] whose `pooler_output` is the projected
    (unnormalised) embedding, as CLIP and SigLIP do in Transformers 5 (they returned the embedding tensor before).
    """

    config: MiCoConfig
    # checkpoints of the captioning / pretraining heads also carry the language-model head
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    # PEFT renames adapter keys with this mapping on load: adapters trained on a head class load onto the base model
    _checkpoint_conversion_mapping = {r"^mico\.": ""}

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        config.text_config.encoder_hidden_size = text_width
        self.vision_model = MiCoVisionModel._from_config(config.vision_config)
        self.text_model = MiCoTextModel._from_config(config.text_config)

        encoders = list(config.knowledge_modalities)
        self.modality_bridges = nn.ModuleDict({name: MiCoBridge(vision_width, text_width) for name in encoders})
        self.modality_bridges[SUBTITLE] = MiCoBridge(text_width, text_width)
        self.frame_embeddings = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(1, frames, text_width))
                for name, frames in config.knowledge_modalities.items()
            }
        )
        self.type_embeddings = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(1, 1, text_width)) for name in [*encoders, SUBTITLE]}
        )

        head_inputs = {"text": text_width, SUBTITLE: text_width, **dict.fromkeys(encoders, vision_width)}
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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    # ---- registry inputs ------------------------------------------------------------------------------------------

    def modality_inputs(self, kwargs: dict, strict: bool = True) -> dict[str, tuple[ModalitySpec, torch.Tensor]]:
        """The modality inputs given ([`MiCoModalityKwargs`]), by registry name and in context order, popped out of
        `kwargs`. An input this configuration does not take is refused by name, as are two inputs of one encoder
        (images and videos); with `strict`, any keyword argument left that is not a Transformers keyword argument
        (`output_attentions`, ...) is a `TypeError`."""
        specs = self.config.modality_specs
        input_names = {spec.input_name for spec in specs.values()}
        given = {
            key: kwargs.pop(key)
            for key in list(kwargs)
            if key in input_names or key in BUILTIN_INPUT_NAMES or key.endswith("_values")
        }
        if strict:
            unexpected = sorted(key for key in kwargs if key not in TOWER_KWARGS)
            if unexpected:
                raise TypeError(
                    f"unexpected arguments {unexpected}; modality inputs are {', '.join(sorted(input_names))}"
                )
        found: dict[str, tuple[ModalitySpec, torch.Tensor]] = {}
        encoders: dict[str, str] = {}
        for input_name, values in given.items():
            if values is None:
                continue
            spec = self.config.spec_for_input(input_name)
            if spec.encoder in encoders:
                raise ValueError(
                    f"{encoders[spec.encoder]} and {spec.name} are both encoded by {spec.encoder!r}; give one of them "
                    "(images or videos, not both)"
                )
            encoders[spec.encoder] = spec.name
            found[spec.name] = (spec, values)
        check_batch_sizes({spec.input_name: values for spec, values in found.values()})
        return {name: found[name] for name in specs if name in found}

    # ---- projection API ----------------------------------------------------------------------------------------------

    def encode_modality(self, name: str, values: torch.Tensor, **kwargs) -> torch.Tensor:
        """ViT tokens of a registry modality: `(batch, frames, tokens, vision_width)`.

        Args:
            name (`str`): the registry name (`"image"`, `"video"`, `"audio"`, `"depth"`, `"thermal"`, ...).
            values (`torch.Tensor`): `(batch, frames, 3, H, W)`; image-like modalities also take `(batch, 3, H, W)`
                (one frame); spectrogram modalities (audio) take `(batch, slices, H, W)`, repeated to 3 channels.
            kwargs: passed to the vision tower (`output_attentions`, ...).
        """
        return self._encode(self._spec(name), values, **kwargs).last_hidden_state

    def _spec(self, name: str) -> ModalitySpec:
        specs = self.config.modality_specs
        if name not in specs:
            raise ValueError(f"unknown modality {name!r}; this model takes {', '.join(specs)}")
        return specs[name]

    def _encode(self, spec: ModalitySpec, values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """The vision tower's output over every frame, `last_hidden_state` reshaped to (batch, frames, tokens, C)."""
        if spec.layout == "spectrogram":
            if values.dim() != 4:
                raise ValueError(
                    f"{spec.input_name} must be (batch, slices, height, width) spectrograms, got {tuple(values.shape)}"
                )
            values = values.unsqueeze(2).expand(-1, -1, 3, -1, -1)
        elif values.dim() == 4:
            values = values.unsqueeze(1)
        if values.dim() != 5:
            raise ValueError(
                f"{spec.input_name} must be (batch, frames, channels, height, width), got {tuple(values.shape)}"
            )
        batch_size, num_frames = values.shape[:2]
        output = self.vision_model(values.flatten(0, 1), **kwargs)
        tokens = output.last_hidden_state
        output.last_hidden_state = tokens.view(batch_size, num_frames, *tokens.shape[1:])
        return output

    @staticmethod
    def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
        """Contrastive pooling of `(batch, frames, tokens, C)` ViT tokens: the class token of every frame, averaged
        over frames -> `(batch, C)`."""
        return tokens[:, :, 0].mean(dim=1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Text (or subtitle) tokens `(batch, length, D)` from the BERT without cross-attention, with a bidirectional
        padding mask."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def fused_head_for(self, parts: Iterable[str]) -> str:
        """The fused head combining exactly `parts` (encoder names and/or `"subtitle"`)."""
        given = set(parts)
        for name, head_parts in self.config.fused_heads.items():
            if set(head_parts) == given:
                return name
        raise ValueError(
            f"no fused head combines {sorted(given)}; configured fused heads: {dict(self.config.fused_heads)}"
        )

    def project(self, pooled: Mapping[str, torch.Tensor], head: str | None = None) -> torch.Tensor:
        """Contrastive embedding `(batch, projection_dim)`, unnormalised, of pooled features.

        Args:
            pooled (`Mapping[str, torch.Tensor]`): pooled features keyed by encoder name (`vision`, `audio`, ...;
                [`~MiCoModel.pool_tokens`] of its tokens) and/or `text` / `subtitle` (the first-token BERT output).
                One key selects that key's head; several select the fused head combining exactly them, which
                concatenates them in its configured order.
            head (`str`, *optional*): a head name (single or fused) to use instead of choosing by keys.
        """
        if not pooled:
            raise ValueError("project needs at least one pooled feature")
        if head is None:
            head = next(iter(pooled)) if len(pooled) == 1 else self.fused_head_for(pooled)
        if head in self.config.fused_heads:
            parts, layer = self.config.fused_heads[head], self.fused_heads[head]
        elif head in self.contrastive_heads:
            parts, layer = [head], self.contrastive_heads[head]
        else:
            known = [*self.contrastive_heads, *self.fused_heads]
            raise ValueError(f"unknown head {head!r}; this model has {', '.join(known)}")
        missing = [part for part in parts if part not in pooled]
        if missing:
            raise ValueError(f"head {head!r} combines {list(parts)}; missing pooled features {missing}")
        return layer(torch.cat([pooled[part] for part in parts], dim=-1))

    def context_from_tokens(self, encoder: str, tokens: torch.Tensor) -> torch.Tensor:
        """Context tokens `(batch, frames*tokens, D)` of an encoder's ViT tokens `(batch, frames, tokens, C)`: bridge,
        frame embedding (resampled by nearest neighbour when the frame count differs), type embedding. For
        `"subtitle"`, `tokens` is the BERT output `(batch, length, D)` of the subtitle (padding included)."""
        if encoder == SUBTITLE:
            return self.modality_bridges[SUBTITLE](tokens) + self.type_embeddings[SUBTITLE]
        if encoder not in self.config.knowledge_modalities:
            raise ValueError(f"unknown encoder {encoder!r}; configured: {list(self.config.knowledge_modalities)}")
        batch_size, num_frames = tokens.shape[:2]
        if self.config.pool_video:
            tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:].mean(dim=2, keepdim=True)], dim=2)
        hidden_states = self.modality_bridges[encoder](tokens)
        hidden_states = hidden_states + self._frame_embedding(encoder, num_frames).unsqueeze(2)
        hidden_states = hidden_states.reshape(batch_size, -1, hidden_states.shape[-1])
        return hidden_states + self.type_embeddings[encoder]

    def _frame_embedding(self, encoder: str, num_frames: int) -> torch.Tensor:
        """The frame table, resampled along the frame axis by nearest neighbour when the frame count differs."""
        table = self.frame_embeddings[encoder]
        if table.shape[1] == num_frames:
            return table
        resized = F.interpolate(table.float().permute(0, 2, 1), size=num_frames, mode="nearest")
        return resized.permute(0, 2, 1).to(table.dtype)

    # ---- contrastive features -------------------------------------------------------------------------------------

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): tokenized captions.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): padding mask.

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` is the projected text embedding `(batch_size,
            projection_dim)` (before L2 normalisation), `last_hidden_state` the BERT tokens.

        Example:

        ```python
        >>> import torch
        >>> from modeling_mico import MiCoConfig, MiCoModel

        >>> model = MiCoModel(MiCoConfig.from_preset("tiny")).eval()
        >>> model.get_text_features(torch.randint(1000, 2000, (2, 8))).pooler_output.shape
        torch.Size([2, 64])

        ```
        """
        return self._text_features("text", input_ids, attention_mask, **kwargs)

    @can_return_tuple
    def get_subtitle_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """As [`~MiCoModel.get_text_features`], through the subtitle head."""
        return self._text_features(SUBTITLE, input_ids, attention_mask, **kwargs)

    def _text_features(self, head: str, input_ids, attention_mask, **kwargs) -> BaseModelOutputWithPooling:
        output = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state,
            pooler_output=self.project({head: output.last_hidden_state[:, 0]}),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
        )

    @can_return_tuple
    def get_modality_features(self, name: str, values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Contrastive features of any registry modality.

        Args:
            name (`str`): the registry name (`"image"`, `"video"`, `"audio"`, `"depth"`, `"normal"`, `"thermal"`...).
            values (`torch.Tensor`): its model input (see [`~MiCoModel.encode_modality`]).

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` is the projected embedding `(batch_size, projection_dim)`
            (before L2 normalisation); `last_hidden_state` the ViT tokens `(batch_size, frames, tokens, C)`;
            `hidden_states` / `attentions` (on request) are over the `batch_size * frames` images.
        """
        spec = self._spec(name)
        output = self._encode(spec, values, **kwargs)
        output.pooler_output = self.project({spec.encoder: self.pool_tokens(output.last_hidden_state)})
        return output

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Image features (`pooler_output`: projected embedding); `pixel_values` is `(batch, 3, H, W)` or
        `(batch, frames, 3, H, W)`."""
        return self.get_modality_features("image", pixel_values, **kwargs)

    @can_return_tuple
    def get_video_features(self, pixel_values_videos: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Video features from `(batch, frames, 3, H, W)` (`pooler_output`: projected embedding)."""
        return self.get_modality_features("video", pixel_values_videos, **kwargs)

    @can_return_tuple
    def get_audio_features(self, input_features: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Audio features from spectrogram slices `(batch, slices, H, W)` (`pooler_output`: projected embedding)."""
        return self.get_modality_features("audio", input_features, **kwargs)

    @can_return_tuple
    def get_depth_features(self, depth_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Depth features from `(batch, frames, 3, H, W)` depth maps (`pooler_output`: projected embedding)."""
        return self.get_modality_features("depth", depth_values, **kwargs)

    @can_return_tuple
    def get_fused_features(self, **inputs: Unpack[MiCoContextKwargs]) -> BaseModelOutputWithPooling:
        r"""
        Fused-head features of exactly the inputs given: video+audio -> `va`, image+depth -> `id`, video+subtitle ->
        `vs`, video+audio+subtitle -> `vas` (heads come from `config.fused_heads`).

        Args:
            inputs ([`MiCoContextKwargs`]): modality inputs (`pixel_values`, `pixel_values_videos`, `input_features`,
                `<name>_values`, ...) and the subtitle (`subtitle_input_ids`, `subtitle_attention_mask`).

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` is the fused projection `(batch_size, projection_dim)`
            (before L2 normalisation); there is no single tower's `last_hidden_state`.
        """
        subtitle_input_ids, subtitle_attention_mask = pop_subtitle(inputs)
        pooled = {
            spec.encoder: self.pool_tokens(self._encode(spec, values).last_hidden_state)
            for spec, values in self.modality_inputs(inputs).values()
        }
        if subtitle_input_ids is not None:
            pooled[SUBTITLE] = self.encode_text(subtitle_input_ids, subtitle_attention_mask)[:, 0]
        return BaseModelOutputWithPooling(pooler_output=self.project(pooled, self.fused_head_for(pooled)))

    # ---- multimodal context and matching --------------------------------------------------------------------------

    def subtitle_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Subtitle context: the bridge over all token positions (padding included) plus the type embedding."""
        return self.context_from_tokens(SUBTITLE, self.encode_text(input_ids, attention_mask))

    def get_multimodal_context(self, **inputs: Unpack[MiCoContextKwargs]) -> torch.Tensor:
        """The concatenated context `(batch, length, D)` of the inputs given ([`MiCoContextKwargs`]), in context order
        (vision, audio, depth, other configured modalities, subtitle). It is never masked."""
        subtitle_input_ids, subtitle_attention_mask = pop_subtitle(inputs)
        given = self.modality_inputs(inputs)
        parts = [
            self.context_from_tokens(spec.encoder, self._encode(spec, values).last_hidden_state)
            for spec, values in given.values()
        ]
        if subtitle_input_ids is not None:
            media = {spec.input_name: values for spec, values in given.values()}
            check_batch_sizes({**media, "subtitle_input_ids": subtitle_input_ids})
            parts.append(self.subtitle_context(subtitle_input_ids, subtitle_attention_mask))
        if not parts:
            names = [spec.input_name for spec in self.config.modality_specs.values()]
            raise ValueError(f"give at least one modality input ({', '.join(names)}, subtitle_input_ids)")
        return torch.cat(parts, dim=1)

    def get_matching_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **context_inputs: Unpack[MiCoContextKwargs],
    ) -> torch.Tensor:
        """Matched/unmatched logits `(batch, 2)` of each caption with its context (given, or built from the inputs as
        [`~MiCoModel.get_multimodal_context`] does)."""
        if context is None:
            context = self.get_multimodal_context(**context_inputs)
        elif context_inputs:
            raise ValueError(f"give either `context` or modality inputs, not both (got {sorted(context_inputs)})")
        if context.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} captions but a context batch of {context.shape[0]}")
        hidden_states = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=context
        ).last_hidden_state
        return self.itm_head(hidden_states[:, 0])

    def get_matching_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Probability `(batch,)` that each caption matches its context: `softmax(itm_head(first token))[:, 1]`;
        `kwargs` (`context` or the modality inputs) as for [`~MiCoModel.get_matching_logits`]."""
        return self.get_matching_logits(input_ids, attention_mask, **kwargs).softmax(dim=-1)[:, 1]

    # ---- forward ----------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[MiCoModalityKwargs],
    ) -> MiCoOutput:
        r"""
        Contrastive embeddings of the text and of every modality input given, and `logits_per_text_<name>`
        similarity matrices (normalised text x normalised modality embeddings / temperature) when text is given.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): captions.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): their padding.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): segment ids, as
                BERT tokenizers return them by default (Transformers' text pipelines pass them); MiCo uses segment 0.
            kwargs ([`MiCoModalityKwargs`]): the modality inputs (`pixel_values`, `pixel_values_videos`,
                `input_features`, `depth_values`, `<name>_values` of configured extras) and Transformers keyword
                arguments for the towers (`output_attentions`, `output_hidden_states`).

        Returns:
            [`MiCoOutput`]

        Example:

        ```python
        >>> import torch
        >>> from modeling_mico import MiCoConfig, MiCoModel
        >>> model = MiCoModel(MiCoConfig.from_preset("tiny")).eval()
        >>> out = model(input_ids=torch.randint(0, 1000, (2, 8)), pixel_values_videos=torch.randn(2, 4, 3, 64, 64))
        >>> out.logits_per_text_video.shape
        torch.Size([2, 2])

        ```
        """
        inputs = self.modality_inputs(kwargs)
        output = MiCoOutput()
        text_embeds = None
        if input_ids is not None:
            text_output = self.get_text_features(input_ids, attention_mask, token_type_ids=token_type_ids, **kwargs)
            text_embeds = F.normalize(text_output.pooler_output, dim=-1)
            output["text_embeds"] = text_embeds
            output["text_model_output"] = text_output
        modality_outputs = {}
        for name, (_, values) in inputs.items():
            modality_outputs[name] = self.get_modality_features(name, values, **kwargs)
            embeds = F.normalize(modality_outputs[name].pooler_output, dim=-1)
            output[f"{name}_embeds"] = embeds
            if text_embeds is not None:
                output[f"logits_per_text_{name}"] = text_embeds @ embeds.t() / self.temperature
                output[f"logits_per_{name}"] = output[f"logits_per_text_{name}"].t()
        output["temperature"] = self.temperature
        if modality_outputs:
            output["modality_model_outputs"] = modality_outputs
        return output


# --------------------------------------------------------------------------------------------------------------------
# Heads composed on MiCoModel
# --------------------------------------------------------------------------------------------------------------------

# The language-model head's decoder shares the word embeddings (Transformers 5 form: target -> source).
TIED_LM_HEAD = {"lm_head.decoder.weight": "mico.text_model.embeddings.word_embeddings.weight"}

# Public MiCoModel methods that the heads expose too (on `self.mico`), as Transformers' composed heads do.
DELEGATED_METHODS = (
    "get_text_features",
    "get_subtitle_features",
    "get_modality_features",
    "get_image_features",
    "get_video_features",
    "get_audio_features",
    "get_depth_features",
    "get_fused_features",
    "get_multimodal_context",
    "get_matching_logits",
    "get_matching_scores",
)


class MiCoModelWithHeadBase(MiCoPreTrainedModel):
    """Shared plumbing of the heads: a [`MiCoModel`] as `self.mico` (`base_model_prefix`), the language-model head
    tied to its word embeddings, and the public feature methods of `self.mico`. Subclasses call `post_init()` at the
    end of their `__init__`."""

    _tied_weights_keys = TIED_LM_HEAD
    # PEFT renames adapter keys with this mapping on load: adapters trained on `MiCoModel` load onto the heads
    _checkpoint_conversion_mapping = {r"^(?!mico\.|lm_head\.)": "mico."}

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        self.mico = MiCoModel(config)
        self.lm_head = MiCoLMHead(config.text_config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mico.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.mico.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings


def _delegate_to_mico(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.mico, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"[`MiCoModel.{name}`] of `self.mico`."
    return method


for _name in DELEGATED_METHODS:
    setattr(MiCoModelWithHeadBase, _name, _delegate_to_mico(_name))


@dataclass
class MiCoForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`MiCoForPreTraining`].

    Args:
        loss (`torch.FloatTensor`):
            `contrastive_loss + matching_loss + caption_loss` (the terms that ran).
        contrastive_loss (`torch.FloatTensor`):
            Mean over contrastive tasks of the symmetric, label-smoothed cross-entropy against the global batch.
        matching_loss (`torch.FloatTensor`):
            Mean over matching tasks of `itm_loss_weight` x the matching cross-entropy.
        caption_loss (`torch.FloatTensor`):
            Mean over caption tasks of `caption_loss_weight` x the cross-entropy on the masked caption tokens.
        task_losses (`dict[str, torch.FloatTensor]`):
            Every task's term, keyed `contrastive_<task>`, `matching_<task>` and `caption_<task>` (the last two
            times `itm_loss_weight` / `caption_loss_weight`), e.g. `contrastive_tva`. Each mean above is weighted
            by `config.task_loss_weights` (equal weights by default).
        logits_per_text, logits_per_modality (`dict[str, torch.FloatTensor]`):
            Per contrastive (and matching) task, the `(local_batch, global_batch)` similarities divided by the
            temperature; local row i's positive is column `offset + i`.
        matching_logits (`dict[str, torch.FloatTensor]`):
            Per matching task, `(3 * batch, 2)` logits of the positive pairs, the pairs (text, hard-negative context)
            and the pairs (hard-negative text, context), in that order.
        caption_logits (`dict[str, torch.FloatTensor]`):
            Per caption task, `(num_masked, vocab_size)` prediction scores at the masked positions
            (`caption_labels != -100`, row-major).
        caption_input_ids, caption_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            The masked caption shared by all caption tasks and its labels (-100 where not masked).
        temperature (`torch.FloatTensor`):
            The learned temperature.
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


class MiCoForPreTraining(MiCoModelWithHeadBase):
    r"""
    MiCo with its three pretraining losses (omni-modal contrastive, matching with hard negatives, masked caption
    generation): a [`MiCoModel`] (`self.mico`) plus the language-model head tied to its word embeddings. A
    [`MiCoModel`] checkpoint loads into it (the head is then new) and its checkpoints load into [`MiCoModel`].

    Which tasks run is configuration: `config.contrastive_tasks`, `matching_tasks` and `caption_tasks` list tasks
    such as `"tv"` (caption vs. vision: image or video), `"ta"` (audio), `"td"` (depth), `"ts"` (subtitle), `"tva"`
    (vision+audio through the fused `va` head for contrastive, the concatenated context for matching and captions),
    `"th"` for a configured `thermal` modality (letters come from the modality registry, `config.task_letters`).
    Tasks whose inputs are absent from the batch (of any process) are skipped. Every encoder runs once per batch: the
    ViT tokens feed both the pooled contrastive features and the multimodal context. Negatives of the contrastive and
    matching losses come from all processes.

    Hard negatives and caption masks are drawn from torch's global RNG (no `torch.Generator`), so seeding (`set_seed`,
    which `Trainer` calls on every process) makes a run reproducible; processes seeded alike draw the same mask
    *pattern* for their different captions, as in the original.

    The caption loss runs the text branch with a causal mask built by `transformers.masking_utils`, so every
    attention implementation works (`flash_attention_*` included). The losses are batch means: `Trainer` does not
    pass `num_items_in_batch` (`accepts_loss_kwargs = False`).
    """

    accepts_loss_kwargs = False

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        self.tasks = {
            kind: {task: config.parse_task(task) for task in getattr(config, f"{kind}_tasks")} for kind in TASK_KINDS
        }
        for parts in [*self.tasks["contrastive"].values(), *self.tasks["matching"].values()]:
            if len(parts) > 1:
                self.mico.fused_head_for(parts)  # raises when no fused head combines them
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs: Unpack[MiCoContextKwargs],
    ) -> MiCoForPreTrainingOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                The captions (`[CLS] ... [SEP]`, padded).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Their padding mask.
            return_loss (`bool`, *optional*, defaults to `True`):
                With `False` only the contrastive similarities are computed (no losses, no random draws).
            kwargs ([`MiCoContextKwargs`]):
                The modality inputs (`pixel_values`, `pixel_values_videos`, `input_features`, `depth_values`,
                `<name>_values` of configured extras) and the subtitle (`subtitle_input_ids`,
                `subtitle_attention_mask`, the `s` modality).

        Returns:
            [`MiCoForPreTrainingOutput`]

        Example:

        ```python
        >>> import torch
        >>> from modeling_mico import MiCoConfig, MiCoForPreTraining
        >>> config = MiCoConfig.from_preset("tiny")
        >>> model = MiCoForPreTraining(config)
        >>> ids = torch.randint(1000, 2000, (4, 12))
        >>> out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(4, 3, 64, 64))
        >>> sorted(out.task_losses)
        ['caption_tv', 'contrastive_tv', 'matching_tv']

        ```
        """
        mico = self.mico
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        subtitle_input_ids, subtitle_attention_mask = pop_subtitle(kwargs)
        inputs = mico.modality_inputs(kwargs)
        batch = {spec.input_name: values for spec, values in inputs.values()}
        check_batch_sizes({"input_ids": input_ids, **batch, "subtitle_input_ids": subtitle_input_ids})
        kinds = ("contrastive",) if not return_loss else TASK_KINDS
        given = {spec.encoder for spec, _ in inputs.values()} | (
            {SUBTITLE} if subtitle_input_ids is not None else set()
        )
        tasks = self._runnable_tasks(kinds, given)

        # every encoder runs once; pooled features and contexts are derived from the same tokens
        needed = {part for kind in tasks.values() for parts in kind.values() for part in parts}
        tokens = {
            spec.encoder: mico.encode_modality(name, values)
            for name, (spec, values) in inputs.items()
            if spec.encoder in needed
        }
        pooled = {encoder: mico.pool_tokens(value) for encoder, value in tokens.items()}
        if SUBTITLE in needed:
            tokens[SUBTITLE] = mico.encode_text(subtitle_input_ids, subtitle_attention_mask)
            pooled[SUBTITLE] = tokens[SUBTITLE][:, 0]
        text_embeds = F.normalize(mico.project({"text": mico.encode_text(input_ids, attention_mask)[:, 0]}), dim=-1)
        contexts: dict[str, torch.Tensor] = {}

        def context_of(parts: tuple[str, ...]) -> torch.Tensor:
            for part in parts:
                if part not in contexts:
                    contexts[part] = mico.context_from_tokens(part, tokens[part])
            return torch.cat([contexts[part] for part in tokens if part in parts], dim=1)  # tokens: context order

        output = MiCoForPreTrainingOutput(
            task_losses={}, logits_per_text={}, logits_per_modality={}, temperature=mico.temperature
        )
        # similarities of contrastive tasks, and of matching tasks (their hard negatives are drawn from them)
        similarity: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        contrastive_terms = {}
        for task, parts in {**tasks.get("matching", {}), **tasks["contrastive"]}.items():
            modality_embeds = F.normalize(mico.project({part: pooled[part] for part in parts}), dim=-1)
            loss, logits_per_text, logits_per_modality, offset = contrastive_loss(
                text_embeds, modality_embeds, mico.temperature, self.config.label_smoothing
            )
            similarity[task] = (logits_per_text, logits_per_modality, offset)
            output.logits_per_text[task] = logits_per_text
            output.logits_per_modality[task] = logits_per_modality
            if task in tasks["contrastive"]:
                output.task_losses[f"contrastive_{task}"] = loss
                contrastive_terms[task] = loss
        if contrastive_terms:
            output.contrastive_loss = self._kind_loss("contrastive", contrastive_terms)

        if return_loss:
            matching_terms = {}
            for task, parts in tasks["matching"].items():
                logits_per_text, logits_per_modality, offset = similarity[task]
                if logits_per_text.shape[1] < 2:
                    logger.warning_once("matching loss skipped: hard negatives need at least 2 samples in the batch")
                    continue
                logits = self._matching_logits(
                    input_ids, attention_mask, context_of(parts), logits_per_text, logits_per_modality, offset
                )
                labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
                labels[: input_ids.shape[0]] = 1
                loss = self.config.itm_loss_weight * F.cross_entropy(logits, labels)
                output.matching_logits = {**(output.matching_logits or {}), task: logits}
                output.task_losses[f"matching_{task}"] = loss
                matching_terms[task] = loss
            if matching_terms:
                output.matching_loss = self._kind_loss("matching", matching_terms)

            if tasks["caption"]:
                self._caption_losses(output, input_ids, attention_mask, tasks["caption"], context_of)

            terms = [output.contrastive_loss, output.matching_loss, output.caption_loss]
            output.loss = sum(term for term in terms if term is not None)
        return output

    def _caption_losses(self, output, input_ids, attention_mask, tasks, context_of) -> None:
        """Mask the captions once, then per task: causal text branch over the task's context, cross-entropy on the
        masked positions."""
        text_config = self.config.text_config
        masked_ids, labels = mask_caption_tokens(
            input_ids,
            attention_mask,
            self.config.caption_mask_probability,
            text_config.mask_token_id,
            text_config.vocab_size,
        )
        selected = labels != -100
        output.caption_input_ids, output.caption_labels, output.caption_logits = masked_ids, labels, {}
        if not selected.any():  # captions of one token ([CLS]) only: nothing to predict, no loss (not a NaN)
            logger.warning_once("caption loss skipped: the captions of this batch have no token after [CLS]")
            return
        terms = {}
        for task, parts in tasks.items():
            hidden_states = self.mico.text_model(
                input_ids=masked_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=context_of(parts),
                is_causal=True,
            ).last_hidden_state
            logits = self.lm_head(hidden_states[selected])
            loss = self.config.caption_loss_weight * F.cross_entropy(logits.float(), labels[selected])
            output.caption_logits[task] = logits
            output.task_losses[f"caption_{task}"] = loss
            terms[task] = loss
        output.caption_loss = self._kind_loss("caption", terms)

    def _kind_loss(self, kind: str, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one kind: the mean of its tasks' losses, weighted by `config.task_loss_weights`."""
        weights = [self.config.task_loss_weights.get(f"{kind}_{task}", 1) for task in losses]
        stacked = torch.stack(list(losses.values()))
        if all(weight == 1 for weight in weights):
            return stacked.mean()  # the release's arithmetic, bit for bit
        weights = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        return (stacked * weights).sum() / weights.sum()

    def _runnable_tasks(self, kinds: tuple[str, ...], given: set[str]) -> dict[str, dict[str, tuple[str, ...]]]:
        """The configured tasks whose modalities are in this batch on every process; raises when none is."""
        used = sorted({part for kind in kinds for parts in self.tasks[kind].values() for part in parts})
        present = present_everywhere({part: part in given for part in used}, self.mico.temperature.device)
        tasks = {
            kind: {task: parts for task, parts in self.tasks[kind].items() if all(present[p] for p in parts)}
            for kind in kinds
        }
        if not any(tasks.values()):
            configured = {kind: list(self.tasks[kind]) for kind in kinds}
            raise ValueError(
                f"no pretraining task can run on this batch: it carries {sorted(given) or 'no modality'} (on every "
                f"process), the configured tasks are {configured}"
            )
        return tasks

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
        return self.mico.get_matching_logits(
            torch.cat([input_ids, input_ids, all_ids[negative_texts]]),
            torch.cat([attention_mask, attention_mask, all_masks[negative_texts]]),
            context=torch.cat([context, all_contexts[negative_contexts], context]),
        )


# --------------------------------------------------------------------------------------------------------------------
# Caption generation
# --------------------------------------------------------------------------------------------------------------------


class MiCoForConditionalGeneration(MiCoModelWithHeadBase, MiCoGenerationMixin):
    r"""
    MiCo captioning and question answering: a [`MiCoModel`] (`self.mico`) plus the language-model head tied to its
    word embeddings, decoded with Transformers' `generate` (greedy, beam search, sampling, streamers, ...).

    Decoding follows the original "append a `[MASK]`" scheme: the text starts at `[CLS]`, and the distribution of the
    next token is read at a `[MASK]` appended after the tokens so far, under a causal mask and with cross-attention to
    the multimodal context of whatever modality inputs are given (built once per call). The keys/values of the real
    tokens are cached (the `[MASK]` never is), which gives the same tokens as the original's full recomputation
    (`use_cache=False`) much faster. Beam search scores finished hypotheses as the release did (Transformers 4.31:
    length penalty over the length *including* the prompt, see [`MiCoGenerationMixin`]);
    `length_penalty_includes_prompt=False` selects the rule of current Transformers (generated tokens only).

    Masks come from `transformers.masking_utils`, so captioning runs with every attention implementation. Limit: the
    `flash_attention_*` kernels cannot express a question prefix read bidirectionally inside the causal mask
    (`generate(input_ids=question, ...)`) or an explicit 3-D mask; those raise a `ValueError` (use `"sdpa"`).

    Example:

    ```python
    >>> import torch
    >>> from modeling_mico import MiCoConfig, MiCoForConditionalGeneration
    >>> config = MiCoConfig.from_preset("tiny")
    >>> model = MiCoForConditionalGeneration(config).eval()
    >>> ids = model.generate(pixel_values_videos=torch.randn(2, 4, 3, 64, 64), max_new_tokens=5)
    >>> ids[:, 0].tolist()  # every caption starts at [CLS]
    [101, 101]

    ```
    """

    _decoding_weights_kept = 0  # depth of `keep_decoding_weights` blocks

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        # labels are the token *at* each position (MiCo predicts where a [MASK] stands): no shift
        self.loss_type = "ForMaskedLM"
        self.post_init()
        self.generation_config = default_generation_config(config)

    @contextlib.contextmanager
    def keep_decoding_weights(self) -> Iterator[None]:
        """Within the block, `generate` keeps the decoding weights it builds (the concatenated projections and the
        text tower's and head's weights packed for the few-row kernel, or for oneDNN for several captions or beams,
        about one more copy of them) and reuses them at the next call instead of building them again (about 0.2 s
        for BERT-base): for captioning many batches. A weight updated in place or given new storage is seen and its decoding weight
        rebuilt, but a change through `.data` (PEFT's `merge_adapter`, hand-written EMA updates) is not: change
        weights that way outside the block. They are freed on leaving it."""
        self._decoding_weights_kept += 1
        try:
            yield
        finally:
            self._decoding_weights_kept -= 1
            if not self._decoding_weights_kept:
                release_decoding_weights(self)

    def _apply(self, fn, recurse: bool = True):
        # `.to()`, `.float()`, `.cuda()`, ...: kept decoding weights would pin the old storage until the next call
        release_decoding_weights(self)
        return super()._apply(fn, recurse)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        prefix_length: int = 0,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[MiCoContextKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Language-model logits of every text position under the caption mask (causal, a bidirectional `prefix_length`)
        with cross-attention to the multimodal context. Positions are the plain index `0..n` (cached tokens included).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Text ids; to read the next-token distribution, end them with `[MASK]` (what `generate` does).
            attention_mask (`torch.Tensor`, *optional*):
                `(batch_size, past_length + sequence_length)` padding mask, turned into the caption mask, or an
                explicit `(batch_size, sequence_length, past_length + sequence_length)` mask (1 = may attend).
            context (`torch.Tensor` of shape `(items, context_length, hidden_size)`, *optional*):
                A multimodal context from [`~MiCoModel.get_multimodal_context`] (`items` = `batch_size`, or a divisor
                of it: one context for `batch_size // items` consecutive rows, as `generate` passes it to beams and
                returned sequences); otherwise it is built from the modality inputs in `kwargs`.
            prefix_length (`int`, *optional*, defaults to 0):
                Number of leading positions read bidirectionally (a question), as in the original question answering.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Target ids *at* each position (not shifted: MiCo predicts a token where a `[MASK]` stands), -100 where
                no loss is taken; the loss is `self.loss_function` (masked-LM cross-entropy).
            cache ([`Cache`], *optional*):
                Keys/values of earlier tokens and of the context (an [`EncoderDecoderCache`]; a [`DynamicCache`] is
                taken as its self-attention part).
            use_cache (`bool`, *optional*):
                Create a cache when none is given.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits for the last `logits_to_keep` positions only (0 = all), or for the given indices
                (see `slice_logits_to_keep`).
            kwargs ([`MiCoContextKwargs`]):
                The modality inputs whose context the text reads (`pixel_values`, `pixel_values_videos`,
                `input_features`, `depth_values`, `<name>_values` of configured extras, `subtitle_input_ids`,
                `subtitle_attention_mask`) when no `context` is given, and Transformers keyword arguments.

        Returns:
            [`CausalLMOutputWithCrossAttentions`]
        """
        context = self._resolve_context(context, kwargs)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config.text_config), DynamicCache())
        elif isinstance(cache, DynamicCache):
            cache = EncoderDecoderCache(cache, DynamicCache())
        outputs = self.mico.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=context,
            cache=cache,
            is_causal=True,
            prefix_length=prefix_length,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            cache=cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )

    def _resolve_context(self, context: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """The given context, or the one built from the modality inputs (exactly one of the two), which are popped
        out of `kwargs` ([`MiCoContextKwargs`])."""
        subtitle_input_ids, subtitle_attention_mask = pop_subtitle(kwargs)
        inputs = self.mico.modality_inputs(kwargs, strict=False)
        if context is None:
            by_input = {spec.input_name: values for spec, values in inputs.values()}
            return self.mico.get_multimodal_context(
                subtitle_input_ids=subtitle_input_ids, subtitle_attention_mask=subtitle_attention_mask, **by_input
            )
        if inputs or subtitle_input_ids is not None:
            given = [spec.input_name for spec, _ in inputs.values()] or ["subtitle_input_ids"]
            raise ValueError(f"give either `context` or modality inputs, not both (got {given})")
        return context

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | ModelOutput:
        r"""
        Caption (or answer about) the modality inputs given, in any combination; the multimodal context is built once.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prefix_length)`, *optional*):
                A text prefix read bidirectionally, e.g. a tokenized question (padded to a fixed length as in the
                original, which also fixes the answer's positions); the answer is decoded after it, from `[CLS]`.
            attention_mask (`torch.Tensor` of shape `(batch_size, prefix_length)`, *optional*):
                Padding of `input_ids`.
            context (`torch.Tensor`, *optional*):
                A precomputed multimodal context instead of the modality inputs.
            generate_kwargs:
                The modality inputs ([`MiCoContextKwargs`]: `pixel_values`, `pixel_values_videos`, `input_features`,
                `depth_values`, `<name>_values` of configured extras, `subtitle_input_ids`, `subtitle_attention_mask`),
                and anything [`~GenerationMixin.generate`] takes
                (`num_beams`, `do_sample`, `max_new_tokens`, `num_return_sequences`, `streamer`,
                `stopping_criteria`, ...), plus `length_penalty_includes_prompt` (default `True`, the release's beam
                scoring). Defaults come from `model.generation_config`.

        Returns:
            `torch.LongTensor`: the ids of the prefix, `[CLS]` and the generated tokens (`[PAD]` after `[SEP]`), or a
            [`~generation.GenerateOutput`] with `return_dict_in_generate=True`.
        """
        context = self._resolve_context(context, generate_kwargs)
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
        # one matrix product for q/k/v, one for the context's k/v; weights packed for the few-row kernel where it
        # serves, else for oneDNN when a step multiplies 4 rows or more (the [MASK] probe doubles the rows of every
        # caption or beam); kept inside `keep_decoding_weights`
        num_beams = generate_kwargs.get("num_beams", generation_config.num_beams) or 1
        prepack = batch_size * num_beams >= 2 or decoding_kernels_available()
        keep = self._decoding_weights_kept > 0
        with fused_projections(self.mico.text_model, self.lm_head, prepack=prepack, keep=keep):
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

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs
    ) -> tuple[torch.LongTensor, dict]:
        """Expand the text inputs per beam / returned sequence but keep one context per item: cross-attention reads an
        item's keys/values for all its rows (see `MiCoTextModel`), so they are neither copied nor reordered."""
        context = model_kwargs.pop("context", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs["context"] = context
        return input_ids, model_kwargs

    def _reorder_cache(self, cache: EncoderDecoderCache, beam_idx: torch.LongTensor) -> EncoderDecoderCache:
        """Beam search: reorder the self-attention keys/values only; the context's are per item, shared by its beams
        (a beam never moves to another item)."""
        cache.self_attention_cache.reorder_cache(beam_idx)
        return cache

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        """Drop the `[MASK]` from the self-attention cache: only real tokens are kept."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            cache.crop(-1)
        return model_kwargs


class MiCoForZeroShotClassification(MiCoModel):
    r"""
    [`MiCoModel`] registered for `AutoModelForZeroShotImageClassification`, so that Transformers'
    `zero-shot-image-classification` pipeline takes MiCo checkpoints: its output carries `logits_per_image` (and
    `logits_per_video` / `logits_per_audio` / `logits_per_depth`), the similarities divided by the temperature the
    model was trained with. Same weights and methods as [`MiCoModel`].
    """


# --------------------------------------------------------------------------------------------------------------------
# Classification heads
# --------------------------------------------------------------------------------------------------------------------


# Configuration fields of the classification heads that `from_pretrained` takes as keyword arguments.
HEAD_CONFIG_KEYS = (
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
    "classifier_modalities",
    "classifier_dropout",
)


class MiCoClassificationHeadBase(MiCoPreTrainedModel):
    r"""
    Shared plumbing of the classification heads: a [`MiCoModel`] (`self.mico`), the pooled features of the
    modalities in `config.classifier_modalities` (default: the class's own modality; e.g. `["video", "audio"]` for
    fused video+audio), each the class token of every frame averaged over frames ([`~MiCoModel.pool_tokens`], as the
    contrastive heads pool), concatenated in that order, layer-normalised (`fc_norm`, as BEiT/EVA fine-tuning does),
    then `dropout` (`config.classifier_dropout`, default 0) and a linear `classifier` to `config.num_labels` logits.

    The loss follows `config.problem_type` (Transformers' `ForSequenceClassification` loss): cross-entropy for
    `"single_label_classification"` (integer labels), binary cross-entropy for `"multi_label_classification"`
    (float multi-hot labels, as AudioSet needs), MSE for `"regression"`; unset, it is inferred from the labels.

    Any MiCo checkpoint (a [`MiCoModel`] / head-layout directory, or an original checkpoint through the package's
    loader) loads into these classes: the encoder keeps its weights, `fc_norm` and `classifier` are new. The text
    branch of `self.mico` is loaded but unused.
    """

    modality: str = ""
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    # the head is new when loading an encoder checkpoint (not reported as missing)
    _keys_to_ignore_on_load_missing = [r"^fc_norm\.", r"^classifier\."]
    # PEFT renames adapter keys with this mapping on load: adapters trained on `MiCoModel` load onto these heads
    _checkpoint_conversion_mapping = {r"^(?!mico\.|fc_norm\.|classifier\.)": "mico."}

    def __init__(self, config: MiCoConfig):
        super().__init__(config)
        self.loss_type = "ForSequenceClassification"
        self.mico = MiCoModel(config)
        self.build_head()
        self.post_init()

    def build_head(self) -> None:
        """(Re)create `fc_norm`, `dropout` and `classifier` for the configuration's modalities and labels."""
        config = self.config
        self.num_labels = config.num_labels
        self.classifier_modalities = self.resolve_classifier_modalities(config)
        width = config.vision_config.hidden_size * len(self.classifier_modalities)
        self.fc_norm = nn.LayerNorm(width, eps=config.vision_config.layer_norm_eps)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load any MiCo checkpoint (see [`MiCoPreTrainedModel.from_pretrained`]; original checkpoints too). The head
        settings `num_labels`, `id2label`, `label2id`, `problem_type`, `classifier_modalities` and
        `classifier_dropout` given as keyword arguments update the loaded configuration; when they change the
        head's shape (labels, modalities), the head is new (initialised), the encoder kept."""
        overrides = {key: kwargs.pop(key) for key in HEAD_CONFIG_KEYS if key in kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if overrides:
            (loaded[0] if isinstance(loaded, tuple) else loaded).configure_head(**overrides)
        return loaded

    def configure_head(self, **settings) -> None:
        """Update the head settings (`HEAD_CONFIG_KEYS`: `num_labels`, `id2label`, `label2id`, `problem_type`,
        `classifier_modalities`, `classifier_dropout`) of the configuration; a new number of labels or new modalities
        make a new, initialised head (on the encoder's device and dtype)."""
        unknown = sorted(set(settings) - set(HEAD_CONFIG_KEYS))
        if unknown:
            raise TypeError(f"unknown head settings {unknown}; choose among {list(HEAD_CONFIG_KEYS)}")
        before = (self.config.num_labels, list(self.classifier_modalities))
        if "id2label" not in settings and settings.get("num_labels", before[0]) != before[0]:
            settings["id2label"] = {i: f"LABEL_{i}" for i in range(settings["num_labels"])}
        for key, value in settings.items():
            setattr(self.config, key, value)
        if (self.config.num_labels, self.resolve_classifier_modalities(self.config)) != before:
            parameter = self.mico.temperature
            self.build_head()
            for module in (self.fc_norm, self.classifier):
                module.apply(self._init_weights)
                module.to(device=parameter.device, dtype=parameter.dtype)
        else:
            self.dropout.p = getattr(self.config, "classifier_dropout", None) or 0.0

    @classmethod
    def resolve_classifier_modalities(cls, config: MiCoConfig) -> list[str]:
        """`config.classifier_modalities` (default `[cls.modality]`), checked: registry modalities of this
        configuration, including the class's own, at most one per encoder (images or videos, not both)."""
        names = list(getattr(config, "classifier_modalities", None) or [cls.modality])
        specs = config.modality_specs
        unknown = [name for name in names if name not in specs]
        if unknown:
            raise ValueError(
                f"classifier_modalities {unknown} are not modalities of this model; choose among {list(specs)}"
            )
        if cls.modality not in names:
            raise ValueError(
                f"{cls.__name__} classifies {cls.modality!r}: classifier_modalities must include it, got {names}"
            )
        encoders = [specs[name].encoder for name in names]
        if len(set(encoders)) != len(encoders) or len(set(names)) != len(names):
            raise ValueError(
                f"classifier_modalities {names} must name one modality per encoder (images or videos, not both)"
            )
        return names

    def get_input_embeddings(self) -> nn.Module:
        return self.mico.vision_model.get_input_embeddings()

    def pooled_features(self, inputs: Mapping[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, tuple, tuple]:
        """The concatenated pooled features `(batch, modalities * vision_width)` of `inputs` (registry name ->
        model input), with the towers' hidden states and attentions (when asked, modality after modality)."""
        pooled, hidden_states, attentions = [], (), ()
        for name in self.classifier_modalities:
            output = self.mico.get_modality_features(name, inputs[name], **kwargs)
            pooled.append(self.mico.pool_tokens(output.last_hidden_state))
            hidden_states += output.hidden_states or ()
            attentions += output.attentions or ()
        return torch.cat(pooled, dim=-1), hidden_states, attentions

    @can_return_tuple
    def forward(
        self, labels: torch.Tensor | None = None, **kwargs: Unpack[MiCoModalityKwargs]
    ) -> SequenceClassifierOutput:
        r"""
        Args:
            kwargs ([`MiCoModalityKwargs`]):
                The inputs of the modalities in `classifier_modalities` (`pixel_values`, `pixel_values_videos`,
                `input_features`, `depth_values`, `<name>_values` of configured extras); exactly those must be given.
                With `Trainer` on a dataset of prepared inputs, set `remove_unused_columns=False`: they are keyword
                arguments, not named parameters, so Trainer would drop their columns.
            labels (`torch.Tensor`, *optional*):
                `(batch_size,)` class indices or `(batch_size, num_labels)` class probabilities (single-label; soft
                targets of mixup / cutmix), `(batch_size, num_labels)` multi-hot floats (multi-label) or
                `(batch_size,)` / `(batch_size, num_labels)` floats (regression).

        Returns:
            [`SequenceClassifierOutput`]: `logits` `(batch_size, num_labels)`, `loss` when `labels` are given.
        """
        given = {name: values for name, (_, values) in self.mico.modality_inputs(kwargs).items()}
        if set(given) != set(self.classifier_modalities):
            specs = self.config.modality_specs
            expected = [specs[name].input_name for name in self.classifier_modalities]
            got = [specs[name].input_name for name in given]
            hint = " (with Trainer, keep the input columns: remove_unused_columns=False)" if not got else ""
            raise ValueError(f"{type(self).__name__} takes {expected} (classifier_modalities), got {got}{hint}")
        features, hidden_states, attentions = self.pooled_features(given, **kwargs)
        logits = self.classifier(self.dropout(self.fc_norm(features)))
        loss = None
        if labels is not None and self.config.problem_type == "single_label_classification" and labels.dim() == 2:
            loss = F.cross_entropy(logits, labels.to(logits.dtype))  # class probabilities (mixup / cutmix targets)
        elif labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=hidden_states or None, attentions=attentions or None
        )


class MiCoForImageClassification(MiCoClassificationHeadBase):
    r"""
    MiCo image classification (`pixel_values`, `(batch, 3, H, W)`); `config.classifier_modalities=["image",
    "depth"]` fuses depth maps too. See [`MiCoClassificationHeadBase`].

    Example:

    ```python
    >>> import torch
    >>> from modeling_mico import MiCoConfig, MiCoForImageClassification
    >>> config = MiCoConfig.from_preset("tiny", num_labels=3)
    >>> model = MiCoForImageClassification(config).eval()
    >>> model(pixel_values=torch.randn(2, 3, 64, 64), labels=torch.tensor([0, 2])).logits.shape
    torch.Size([2, 3])

    ```
    """

    modality = "image"
    main_input_name = "pixel_values"
    input_modalities = ("image",)


class MiCoForVideoClassification(MiCoClassificationHeadBase):
    r"""
    MiCo video classification (`pixel_values_videos`, `(batch, frames, 3, H, W)`); `config.classifier_modalities=
    ["video", "audio"]` fuses the soundtrack (`input_features`). See [`MiCoClassificationHeadBase`].
    """

    modality = "video"
    main_input_name = "pixel_values_videos"
    input_modalities = ("video", "audio")


class MiCoForAudioClassification(MiCoClassificationHeadBase):
    r"""
    MiCo audio classification (`input_features`, spectrogram slices `(batch, slices, H, W)`); single- or multi-label
    (`problem_type="multi_label_classification"`, as AudioSet). See [`MiCoClassificationHeadBase`].
    """

    modality = "audio"
    main_input_name = "input_features"
    input_modalities = ("audio",)


class MiCoForDepthClassification(MiCoClassificationHeadBase):
    r"""
    MiCo depth-map classification (`depth_values`, as [`MiCoProcessor`] prepares depth maps). Transformers has no
    Auto class or pipeline for depth classification: load it by class. See [`MiCoClassificationHeadBase`].
    """

    modality = "depth"
    main_input_name = "depth_values"
    input_modalities = ("image",)


__all__ = [
    "MiCoClassificationHeadBase",
    "MiCoContextKwargs",
    "MiCoForAudioClassification",
    "MiCoForConditionalGeneration",
    "MiCoForDepthClassification",
    "MiCoForImageClassification",
    "MiCoForPreTraining",
    "MiCoForPreTrainingOutput",
    "MiCoForZeroShotClassification",
    "MiCoForVideoClassification",
    "MiCoModalityKwargs",
    "MiCoModel",
    "MiCoOutput",
    "MiCoPreTrainedModel",
    "MiCoTextModel",
    "MiCoVisionModel",
]
