"""MiCo model configuration."""

from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Knowledge modality -> maximum number of frames (slices for audio) of its frame-embedding table.
DEFAULT_KNOWLEDGE_MODALITIES = {"vision": 8, "audio": 4, "depth": 4}

# Fused contrastive head -> the pooled features it concatenates, in order ("subtitle" is the text branch).
DEFAULT_FUSED_HEADS = {
    "va": ["vision", "audio"],
    "id": ["vision", "depth"],
    "vs": ["vision", "subtitle"],
    "vas": ["vision", "audio", "subtitle"],
}


class MiCoVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the EVA-CLIP vision transformer that MiCo shares across all knowledge modalities
    (images, video frames, audio spectrogram slices, depth and normal maps). The defaults describe the
    released EVA01-CLIP-g/14 tower.

    Args:
        hidden_size (`int`, *optional*, defaults to 1408): width of the transformer.
        intermediate_size (`int`, *optional*, defaults to 6144): width of the MLP (`int(1408 * 4.3637)`).
        num_hidden_layers (`int`, *optional*, defaults to 40): number of pre-norm blocks.
        num_attention_heads (`int`, *optional*, defaults to 16): attention heads per block.
        num_channels (`int`, *optional*, defaults to 3): input channels.
        image_size (`int`, *optional*, defaults to 224): input resolution (sets the position-embedding grid).
        patch_size (`int`, *optional*, defaults to 14): side of the square patches.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation (exact GELU).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): LayerNorm epsilon.
        attention_dropout (`float`, *optional*, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal initialisation.
    """

    model_type = "mico_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1408,
        intermediate_size: int = 6144,
        num_hidden_layers: int = 40,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 14,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )


class MiCoTextConfig(PreTrainedConfig):
    r"""
    Configuration of MiCo's text branch: a BERT encoder whose every layer carries a cross-attention block
    over the multimodal context. The defaults describe `bert-base-uncased` as used by the release.

    Args:
        vocab_size (`int`, *optional*, defaults to 30522): WordPiece vocabulary size.
        hidden_size (`int`, *optional*, defaults to 768): width of the encoder.
        num_hidden_layers (`int`, *optional*, defaults to 12): number of layers.
        num_attention_heads (`int`, *optional*, defaults to 12): attention heads (self- and cross-attention).
        intermediate_size (`int`, *optional*, defaults to 3072): feed-forward width.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): feed-forward activation (exact GELU).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1): dropout on embeddings and sub-layer outputs.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1): dropout on attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 512): longest sequence.
        type_vocab_size (`int`, *optional*, defaults to 2): token-type vocabulary.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12): LayerNorm epsilon.
        encoder_hidden_size (`int`, *optional*): width of the cross-attention keys/values; MiCo bridges every
            modality to the text width, so it defaults to `hidden_size`.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal initialisation.
        pad_token_id, bos_token_id, eos_token_id, mask_token_id (`int`): `[PAD]`=0, `[CLS]`=101, `[SEP]`=102,
            `[MASK]`=103 in the BERT vocabulary.
    """

    model_type = "mico_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        encoder_hidden_size: int | None = None,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 101,
        eos_token_id: int = 102,
        mask_token_id: int = 103,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.encoder_hidden_size = encoder_hidden_size if encoder_hidden_size is not None else hidden_size
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )


class MiCoConfig(PreTrainedConfig):
    r"""
    Configuration of a full MiCo model. `MiCoConfig()` describes the released ViT-g/14 omni-modal model
    (`Yiyuan/MiCo-ViT-g-14-omnimodal-300k-b64K`).

    Args:
        vision_config (`dict` or [`MiCoVisionConfig`], *optional*): the shared knowledge-modality encoder.
        text_config (`dict` or [`MiCoTextConfig`], *optional*): the cross-attention BERT.
        projection_dim (`int`, *optional*, defaults to 512): width of the contrastive embeddings.
        knowledge_modalities (`dict[str, int]`, *optional*): every knowledge modality encoded by the vision tower
            and the size of its frame-embedding table. Adding an entry (e.g. `"normal": 2`) creates that
            modality's bridge, frame/type embeddings and contrastive head; its model input is `<name>_values`.
        fused_heads (`dict[str, list[str]]`, *optional*): fused contrastive heads and the pooled features they
            concatenate, in order (`"subtitle"` is the text branch's pooled subtitle).
        temperature_init_value (`float`, *optional*, defaults to 0.07): initial contrastive temperature, which
            *divides* the similarities.
        pool_video (`bool`, *optional*, defaults to `False`): keep only the class token and the mean patch token
            of every frame in the multimodal context.
        max_caption_length (`int`, *optional*, defaults to 40): caption length used by the processor and decoding.
        max_subtitle_length (`int`, *optional*, defaults to 70): subtitle length.
        contrastive_tasks (`list[str]`, *optional*): contrastive pairs trained by [`MiCoForPreTraining`], as
            modality letters after `t` (`"tv"`, `"ta"`, `"td"`, `"tva"`, ...).
        matching_tasks, caption_tasks (`list[str]`, *optional*): contexts used by the matching and caption losses.
        itm_loss_weight (`float`, *optional*, defaults to 0.1): weight of the matching loss.
        caption_mask_probability (`float`, *optional*, defaults to 0.6): token masking rate of the caption loss.
        label_smoothing (`float`, *optional*, defaults to 0.1): label smoothing of the contrastive loss.
    """

    model_type = "mico"
    sub_configs = {"vision_config": MiCoVisionConfig, "text_config": MiCoTextConfig}

    def __init__(
        self,
        vision_config: dict | MiCoVisionConfig | None = None,
        text_config: dict | MiCoTextConfig | None = None,
        projection_dim: int = 512,
        knowledge_modalities: dict[str, int] | None = None,
        fused_heads: dict[str, list[str]] | None = None,
        temperature_init_value: float = 0.07,
        pool_video: bool = False,
        max_caption_length: int = 40,
        max_subtitle_length: int = 70,
        contrastive_tasks: list[str] | None = None,
        matching_tasks: list[str] | None = None,
        caption_tasks: list[str] | None = None,
        itm_loss_weight: float = 0.1,
        caption_mask_probability: float = 0.6,
        label_smoothing: float = 0.1,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = MiCoVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = MiCoVisionConfig(**vision_config)
        if text_config is None:
            text_config = MiCoTextConfig()
        elif isinstance(text_config, dict):
            text_config = MiCoTextConfig(**text_config)
        self.vision_config = vision_config
        self.text_config = text_config
        self.projection_dim = projection_dim
        self.knowledge_modalities = dict(knowledge_modalities or DEFAULT_KNOWLEDGE_MODALITIES)
        self.fused_heads = {name: list(parts) for name, parts in (fused_heads or DEFAULT_FUSED_HEADS).items()}
        self.temperature_init_value = temperature_init_value
        self.pool_video = pool_video
        self.max_caption_length = max_caption_length
        self.max_subtitle_length = max_subtitle_length
        self.contrastive_tasks = list(contrastive_tasks if contrastive_tasks is not None else ["tv", "ta", "td", "tva"])
        self.matching_tasks = list(matching_tasks if matching_tasks is not None else ["tv", "ta", "tva"])
        self.caption_tasks = list(caption_tasks if caption_tasks is not None else ["tv", "ta", "tva"])
        self.itm_loss_weight = itm_loss_weight
        self.caption_mask_probability = caption_mask_probability
        self.label_smoothing = label_smoothing
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        self._validate_modalities()

    def _validate_modalities(self) -> None:
        for name, frames in self.knowledge_modalities.items():
            if not isinstance(frames, int) or frames < 1:
                raise ValueError(f"knowledge_modalities[{name!r}] must be a positive frame count, got {frames!r}")
        known = set(self.knowledge_modalities) | {"subtitle"}
        for head, parts in self.fused_heads.items():
            unknown = [part for part in parts if part not in known]
            if unknown or len(parts) < 2:
                raise ValueError(
                    f"fused_heads[{head!r}] = {parts} must list at least two of {sorted(known)}; unknown: {unknown}"
                )


__all__ = ["MiCoConfig", "MiCoTextConfig", "MiCoVisionConfig"]
