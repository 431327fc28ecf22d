"""MiCoConfig / MiCoModel: attention implementations, the public getters, saving, Auto classes and remote code."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import thermal_config, tiny_config_kwargs
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from transformers.utils.generic import TransformersKwargs

from modeling_mico import (
    MiCoConfig,
    MiCoForConditionalGeneration,
    MiCoForPreTraining,
    MiCoModel,
    MiCoTextModel,
    MiCoVisionModel,
)
from modeling_mico.configuration_mico import BUILTIN_MODALITIES
from modeling_mico.modeling_mico import MiCoContextKwargs, MiCoModalityKwargs


def make_inputs(seed: int = 0, batch: int = 2, padded: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, (batch, 10), generator=generator)
    attention_mask = torch.ones(batch, 10, dtype=torch.long)
    if padded:
        attention_mask[0, 6:] = 0
        input_ids[0, 6:] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(batch, 3, 56, 56, generator=generator),
        "pixel_values_videos": torch.randn(batch, 4, 3, 56, 56, generator=generator),
        "input_features": torch.randn(batch, 3, 56, 56, generator=generator),
        "depth_values": torch.randn(batch, 2, 3, 56, 56, generator=generator),
        "subtitle_input_ids": torch.randint(1000, (batch, 12), generator=generator),
    }


def getters(model: MiCoModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every public getter of MiCoModel on the same inputs."""
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    video_audio = {"pixel_values_videos": inputs["pixel_values_videos"], "input_features": inputs["input_features"]}
    with torch.no_grad():
        return {
            "text": model.get_text_features(**text).pooler_output,
            "image": model.get_image_features(inputs["pixel_values"]).pooler_output,
            "video": model.get_video_features(inputs["pixel_values_videos"]).pooler_output,
            "audio": model.get_audio_features(inputs["input_features"]).pooler_output,
            "depth": model.get_depth_features(inputs["depth_values"]).pooler_output,
            "va": model.get_fused_features(**video_audio).pooler_output,
            "id": model.get_fused_features(
                pixel_values=inputs["pixel_values"], depth_values=inputs["depth_values"]
            ).pooler_output,
            "vas": model.get_fused_features(
                **video_audio, subtitle_input_ids=inputs["subtitle_input_ids"]
            ).pooler_output,
            "context": model.get_multimodal_context(**video_audio, depth_values=inputs["depth_values"]),
            "matching": model.get_matching_scores(**text, **video_audio),
            "logits": model(**text, pixel_values_videos=inputs["pixel_values_videos"]).logits_per_text_video,
        }


@pytest.fixture(scope="module")
def model() -> MiCoModel:
    torch.manual_seed(0)
    return MiCoModel(MiCoConfig(**tiny_config_kwargs())).eval()


def test_default_config_is_the_released_vit_g():
    config = MiCoConfig()
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1408, 40)
    assert (config.vision_config.num_attention_heads, config.vision_config.intermediate_size) == (16, 6144)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers, config.projection_dim) == (
        768,
        12,
        512,
    )
    with torch.device("meta"):
        released = MiCoModel(config)
    assert sum(parameter.numel() for parameter in released.parameters()) == 1_161_640_579


@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_sdpa_agree_on_every_getter(model, padded):
    inputs = make_inputs(padded=padded)
    model.set_attn_implementation("eager")
    eager = getters(model, inputs)
    model.set_attn_implementation("sdpa")
    sdpa = getters(model, inputs)
    for name, value in eager.items():
        torch.testing.assert_close(sdpa[name], value, atol=1e-5, rtol=0, msg=name)


def test_flex_attention_agrees_with_eager_in_inference():
    """flex_attention comes for free through the attention interface and masking_utils (CPU supports it without
    gradients). Bounded to a few seconds of compilation: one tiny text tower and one path, the caption decoder's
    causal mask with padding."""
    from modeling_mico import MiCoTextConfig

    torch.manual_seed(0)
    config = MiCoTextConfig(
        **tiny_config_kwargs(width=32, layers=1, heads=2, text=dict(intermediate_size=32, vocab_size=200))[
            "text_config"
        ]
    )
    text_model = MiCoTextModel(config).eval()
    ids = torch.randint(200, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hidden = {}
    for implementation in ("eager", "flex_attention"):
        text_model.set_attn_implementation(implementation)
        with torch.no_grad():
            hidden[implementation] = text_model(input_ids=ids, attention_mask=mask, is_causal=True).last_hidden_state
    torch.testing.assert_close(hidden["flex_attention"], hidden["eager"], atol=1e-5, rtol=0)


def test_padding_is_ignored_by_text_features(model):
    inputs = make_inputs(padded=True)
    short = model.get_text_features(inputs["input_ids"][:1, :6], inputs["attention_mask"][:1, :6]).pooler_output
    padded = model.get_text_features(inputs["input_ids"][:1], inputs["attention_mask"][:1]).pooler_output
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=0)


def test_features_follow_the_contract(model):
    """Pooling = class token of every frame averaged over frames; context = bridge + frame + type embeddings."""
    inputs = make_inputs()
    videos = inputs["pixel_values_videos"]
    with torch.no_grad():
        tokens = model.vision_model(videos.flatten(0, 1)).last_hidden_state.view(2, 4, 17, 64)
        pooled = tokens[:, :, 0].mean(dim=1)
        torch.testing.assert_close(model.pool_tokens(model.encode_modality("video", videos)), pooled)
        torch.testing.assert_close(model.get_video_features(videos).pooler_output, model.project({"vision": pooled}))
        torch.testing.assert_close(model.project({"vision": pooled}), model.contrastive_heads["vision"](pooled))
        bridge = model.modality_bridges["vision"](tokens) + model.frame_embeddings["vision"].unsqueeze(2)
        expected = bridge.reshape(2, -1, 64) + model.type_embeddings["vision"]
        torch.testing.assert_close(model.get_multimodal_context(pixel_values_videos=videos), expected)
        audio = inputs["input_features"]
        audio_tokens = model.vision_model(audio.flatten(0, 1).unsqueeze(1).expand(-1, 3, -1, -1)).last_hidden_state
        torch.testing.assert_close(
            model.get_audio_features(audio).pooler_output,
            model.contrastive_heads["audio"](audio_tokens.view(2, 3, 17, 64)[:, :, 0].mean(1)),
        )
        pooled_audio = audio_tokens.view(2, 3, 17, 64)[:, :, 0].mean(1)
        fused = model.fused_heads["va"](torch.cat([pooled, pooled_audio], dim=-1))
        torch.testing.assert_close(model.project({"audio": pooled_audio, "vision": pooled}), fused)
        torch.testing.assert_close(
            model.get_fused_features(pixel_values_videos=videos, input_features=audio).pooler_output, fused
        )
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values_videos=videos)
    text = F.normalize(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output, dim=-1)
    video = F.normalize(model.get_video_features(videos).pooler_output, dim=-1)
    torch.testing.assert_close(out.logits_per_text_video, text @ video.t() / model.temperature)
    torch.testing.assert_close(out.video_embeds, video)


def test_frame_embedding_is_resampled_by_nearest_neighbour(model):
    """Two video frames against a table of four: frames take rows 0 and 2 (nearest interpolation)."""
    videos = torch.randn(1, 2, 3, 56, 56)
    with torch.no_grad():
        context = model.get_multimodal_context(pixel_values_videos=videos).view(1, 2, 17, 64)
        tokens = model.vision_model(videos.flatten(0, 1)).last_hidden_state.view(1, 2, 17, 64)
        bridged = model.modality_bridges["vision"](tokens) + model.type_embeddings["vision"].unsqueeze(1)
        table = model.frame_embeddings["vision"][0]
    torch.testing.assert_close(context - bridged, table[[0, 2]].view(1, 2, 1, 64).expand(1, 2, 17, 64))


def test_added_image_like_modality_is_configuration_only():
    """A `thermal` modality declared only in the configuration gets its input, outputs, glue, context and task."""
    torch.manual_seed(0)
    config = thermal_config()
    model = MiCoModel(config).eval()
    assert {"thermal"} <= set(model.modality_bridges) & set(model.frame_embeddings) & set(model.type_embeddings)
    assert "thermal" in model.contrastive_heads
    thermal = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(input_ids=torch.randint(1000, 2000, (2, 6)), thermal_values=thermal)
        assert out.logits_per_text_thermal.shape == (2, 2) and out.thermal_embeds.shape == (2, 64)
        features = model.get_modality_features("thermal", thermal).pooler_output
        torch.testing.assert_close(F.normalize(features, dim=-1), out.thermal_embeds)
        tokens = model.encode_modality("thermal", thermal)
        context = model.get_multimodal_context(pixel_values=torch.randn(2, 3, 64, 64), thermal_values=thermal)
        assert context.shape == (2, 2 * 17, 64)
        torch.testing.assert_close(context[:, 17:], model.context_from_tokens("thermal", tokens))
    pretraining = MiCoForPreTraining(config)
    ids = torch.randint(1000, 2000, (4, 8))
    losses = pretraining(input_ids=ids, thermal_values=torch.randn(4, 3, 64, 64)).task_losses
    assert sorted(losses) == ["caption_th", "contrastive_th", "matching_th"]
    with pytest.raises(ValueError, match="unknown input 'normal_values'"):
        model(input_ids=ids, normal_values=thermal)


def test_extra_builtin_modality_normal():
    config = MiCoConfig(**tiny_config_kwargs(knowledge_modalities={"vision": 4, "audio": 3, "depth": 2, "normal": 2}))
    model = MiCoModel(config).eval()
    normals = torch.randn(2, 1, 3, 56, 56)
    out = model(input_ids=torch.randint(1000, (2, 6)), normal_values=normals)
    assert out["logits_per_text_normal"].shape == (2, 2)
    context = model.get_multimodal_context(pixel_values=torch.randn(2, 3, 56, 56), normal_values=normals)
    assert context.shape == (2, 2 * 17, 64)


def test_modality_kwargs_declare_the_registry_inputs_and_unknown_ones_are_refused(model):
    declared = set(MiCoModalityKwargs.__annotations__) - set(TransformersKwargs.__annotations__)
    assert declared == {spec.input_name for spec in BUILTIN_MODALITIES.values()}
    assert set(MiCoContextKwargs.__annotations__) - set(MiCoModalityKwargs.__annotations__) == {
        "subtitle_input_ids",
        "subtitle_attention_mask",
    }
    vision_only = MiCoModel(MiCoConfig(**tiny_config_kwargs(knowledge_modalities={"vision": 2}))).eval()
    with pytest.raises(ValueError, match="unknown input 'input_features'; this model takes pixel_values"):
        vision_only(input_ids=torch.ones(1, 4, dtype=torch.long), input_features=torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match=r"different batch sizes \(pixel_values_videos 1, subtitle_input_ids 2\)"):
        model.get_multimodal_context(
            pixel_values_videos=torch.randn(1, 2, 3, 56, 56), subtitle_input_ids=torch.ones(2, 4, dtype=torch.long)
        )


def test_bad_inputs_fail_loudly(model):
    with pytest.raises(ValueError, match="56x56"):
        model.get_image_features(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="input_features must be"):
        model.get_audio_features(torch.randn(1, 3, 1, 56, 56))
    with pytest.raises(ValueError, match="no fused head combines"):
        model.get_fused_features(input_features=torch.randn(1, 3, 56, 56), depth_values=torch.randn(1, 1, 3, 56, 56))
    with pytest.raises(ValueError, match="images or videos, not both"):
        model.get_multimodal_context(
            pixel_values=torch.randn(1, 3, 56, 56), pixel_values_videos=torch.randn(1, 2, 3, 56, 56)
        )
    with pytest.raises(ValueError, match="unknown input 'normal_values'"):
        model.get_multimodal_context(normal_values=torch.randn(1, 1, 3, 56, 56))
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_value=torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="2 captions but a context batch of 1"):
        model.get_matching_scores(torch.ones(2, 4, dtype=torch.long), context=torch.randn(1, 5, 64))
    with pytest.raises(ValueError, match="unknown modality 'vision'; this model takes image, video"):
        model.encode_modality("vision", torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match=r"no fused head combines \['audio', 'depth'\]"):
        model.fused_head_for(["audio", "depth"])
    with pytest.raises(ValueError, match="head 'va' combines"):
        model.project({"vision": torch.randn(1, 64)}, head="va")
    with pytest.raises(StrictDataclassClassValidationError, match="must be divisible"):
        MiCoConfig(vision_config=dict(hidden_size=65, num_attention_heads=4))


def test_output_attentions_and_hidden_states(model):
    model.set_attn_implementation("eager")
    text = model.text_model(
        input_ids=torch.randint(1000, (2, 7)),
        encoder_hidden_states=torch.randn(2, 5, 64),
        output_attentions=True,
        output_hidden_states=True,
    )
    assert len(text.hidden_states) == 3 and text.attentions[0].shape == (2, 4, 7, 7)
    assert text.cross_attentions[0].shape == (2, 4, 7, 5)
    vision = model.vision_model(torch.randn(2, 3, 56, 56), output_attentions=True, output_hidden_states=True)
    assert len(vision.hidden_states) == 3 and vision.attentions[1].shape == (2, 4, 17, 17)
    assert model(input_ids=torch.ones(1, 3, dtype=torch.long), return_dict=False)[0].shape == (1, 32)


def test_model_forward_returns_attentions(model):
    """`MiCoModel.forward` passes `output_attentions` / `output_hidden_states` to both towers."""
    model.set_attn_implementation("eager")
    try:
        out = model(
            input_ids=torch.randint(1000, (2, 7)),
            pixel_values_videos=torch.randn(2, 3, 3, 56, 56),
            output_attentions=True,
            output_hidden_states=True,
        )
    finally:
        model.set_attn_implementation("sdpa")
    text = out.text_model_output
    assert len(text.attentions) == 2 and text.attentions[0].shape == (2, 4, 7, 7)
    assert len(text.hidden_states) == 3
    video = out.modality_model_outputs["video"]
    assert len(video.attentions) == 2 and video.attentions[0].shape == (6, 4, 17, 17)
    assert video.last_hidden_state.shape == (2, 3, 17, 64)
    torch.testing.assert_close(F.normalize(video.pooler_output, dim=-1), out.video_embeds)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in files and not {name for name in files if name.endswith(".bin")}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mico" and config["auto_map"]["AutoModel"] == "modeling_mico.MiCoModel"
    reloaded = MiCoModel.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation).eval()
    inputs = make_inputs()
    expected, got = getters(model, inputs), getters(reloaded, inputs)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MiCoConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is MiCoModel


def test_sub_models_load_through_auto_model(model, tmp_path):
    model.vision_model.save_pretrained(tmp_path / "vision")
    model.text_model.save_pretrained(tmp_path / "text")
    assert type(AutoModel.from_pretrained(tmp_path / "vision")) is MiCoVisionModel
    assert type(AutoModel.from_pretrained(tmp_path / "text")) is MiCoTextModel


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = MiCoConfig(**tiny_config_kwargs())
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    reference, checkpointed = MiCoModel(config), MiCoModel(config)
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inputs = make_inputs()
    for model in (reference, checkpointed):
        model.train()
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values_videos=inputs["pixel_values_videos"],
        )
        matching = model.get_matching_scores(
            inputs["input_ids"], inputs["attention_mask"], input_features=inputs["input_features"]
        )
        (out.logits_per_text_video.logsumexp(-1).sum() + matching.sum()).backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert checkpointed.vision_model.encoder.layers[0].gradient_checkpointing


def test_half_precision_loading(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = MiCoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    features = half.get_video_features(torch.randn(1, 2, 3, 56, 56)).pooler_output
    assert features.dtype == torch.bfloat16 and torch.isfinite(features.float()).all()


def test_device_map_auto_loads_whole_layers(model, tmp_path):
    """`device_map="auto"` loads through accelerate (`_no_split_modules` keeps layers whole; here all on the CPU)."""
    model.save_pretrained(tmp_path)
    placed = MiCoModel.from_pretrained(
        tmp_path, device_map="auto", attn_implementation=model.config._attn_implementation
    )
    assert {parameter.device.type for parameter in placed.parameters()} == {"cpu"}
    videos = torch.randn(1, 2, 3, 56, 56)
    torch.testing.assert_close(
        placed.get_video_features(videos).pooler_output,
        model.get_video_features(videos).pooler_output,
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("head_class", [MiCoForPreTraining, MiCoForConditionalGeneration])
def test_checkpoints_load_across_base_and_heads(model, head_class, tmp_path):
    """A MiCoModel checkpoint loads into a head (`mico.*` prefix added, lm_head new and tied), and a head checkpoint
    into MiCoModel (prefix stripped, lm_head ignored without a warning)."""
    model.save_pretrained(tmp_path / "base")
    head = head_class.from_pretrained(tmp_path / "base")
    for name, value in model.state_dict().items():
        assert torch.equal(head.mico.state_dict()[name], value), name
    assert head.lm_head.decoder.weight is head.mico.text_model.embeddings.word_embeddings.weight

    head.save_pretrained(tmp_path / "head")
    assert any(key.startswith("lm_head.") for key in head.state_dict())
    logger = logging.get_logger("transformers")
    with CaptureLogger(logger) as captured:
        base = MiCoModel.from_pretrained(tmp_path / "head")
    assert "lm_head" not in captured.out
    for name, value in head.mico.state_dict().items():
        assert torch.equal(base.state_dict()[name], value), name
