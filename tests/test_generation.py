"""Caption generation and question answering with `MiCoForConditionalGeneration`: the append-[MASK] decoding scheme,
its key/value cache, the release's (Transformers 4.31) beam scoring, save/load, the captioning CLI and parity with the
captions of the original code."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

from benchmarks.bench_generation import generic_decoding
from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoModel


CLS, SEP, MASK, PAD = 101, 102, 103, 0
PARITY = Path(__file__).parent / "fixtures" / "parity"
MEDIA = Path(__file__).parent / "fixtures" / "media"


def tiny_config(image_size: int = 28) -> MiCoConfig:
    """A tiny model whose random weights give peaked, context-dependent next-token distributions (no near-ties)."""
    return MiCoConfig(
        **tiny_config_kwargs(
            width=32,
            heads=2,
            vision=dict(num_hidden_layers=1, image_size=image_size),
            text=dict(
                vocab_size=160, max_position_embeddings=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
            ),
            initializer_range=0.3,
        )
    )


@pytest.fixture(scope="module")
def model() -> MiCoForConditionalGeneration:
    torch.manual_seed(0)
    config = tiny_config()
    config.text_config.initializer_range = 0.3
    config.vision_config.initializer_range = 0.3
    return MiCoForConditionalGeneration(config).eval()


def knowledge_inputs(name: str, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "pixel_values": (batch_size, 3, 28, 28),
        "pixel_values_videos": (batch_size, 3, 3, 28, 28),
        "input_features": (batch_size, 2, 28, 28),
        "depth_values": (batch_size, 2, 3, 28, 28),
    }
    names = {
        "image": ["pixel_values"],
        "video": ["pixel_values_videos"],
        "audio": ["input_features"],
        "depth": ["depth_values"],
        "combined": ["pixel_values_videos", "input_features", "depth_values"],
    }[name]
    return {key: torch.randn(shapes[key], generator=generator) for key in names}


def strip(ids: torch.Tensor, start: int = 1) -> list[list[int]]:
    """Generated tokens of every row: after the prompt, up to `[SEP]`, without `[PAD]`."""
    rows = []
    for row in ids[:, start:].tolist():
        row = row[: row.index(SEP)] if SEP in row else row
        rows.append([token for token in row if token != PAD])
    return rows


def next_token_log_probs(model, ids: torch.Tensor, context: torch.Tensor, prefix_mask=None) -> torch.Tensor:
    """Straightforward MiCo step: the whole prefix plus `[MASK]`, a full causal mask (a bidirectional question block
    when `prefix_mask` is given), log-probabilities read at the `[MASK]`."""
    ids = torch.cat([ids, torch.full_like(ids[:, :1], MASK)], dim=1)
    length = ids.shape[1]
    mask = torch.ones(length, length).tril()
    padding = torch.ones(ids.shape)
    if prefix_mask is not None:
        prefix = prefix_mask.shape[1]
        mask[:prefix, :prefix] = 1
        padding[:, :prefix] = prefix_mask
    mask = mask[None] * padding[:, None, :]
    hidden = model.mico.text_model(input_ids=ids, attention_mask=mask, encoder_hidden_states=context).last_hidden_state
    return model.lm_head(hidden[:, -1]).float().log_softmax(dim=-1)


def reference_greedy(model, context, max_new_tokens, prefix_ids=None, prefix_mask=None) -> torch.Tensor:
    start = torch.full((context.shape[0], 1), CLS)
    ids = start if prefix_ids is None else torch.cat([prefix_ids, start], dim=1)
    finished = torch.zeros(context.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = next_token_log_probs(model, ids, context, prefix_mask).argmax(dim=-1)
        token = torch.where(finished, PAD, token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == SEP
        if finished.all():
            break
    return ids


def reference_beam_search_431(model, context, num_beams, max_new_tokens, length_penalty):
    """Transformers 4.31 beam search (BeamSearchScorer / BeamHypotheses, early_stopping=False) for one context."""
    max_length = 1 + max_new_tokens
    ids = torch.full((num_beams, 1), CLS)
    beam_scores = torch.tensor([0.0] + [-1e9] * (num_beams - 1))
    hypotheses: list[tuple[float, list[int]]] = []

    def add(hypothesis: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(hypothesis) ** length_penalty)
        worst = min(s for s, _ in hypotheses) if hypotheses else 1e9
        if len(hypotheses) < num_beams or score > worst:
            hypotheses.append((score, hypothesis))
            if len(hypotheses) > num_beams:
                hypotheses.remove(min(hypotheses, key=lambda item: item[0]))

    while True:
        scores = next_token_log_probs(model, ids, context.expand(num_beams, -1, -1)) + beam_scores[:, None]
        vocab_size = scores.shape[-1]
        top_scores, top_indices = scores.view(-1).topk(2 * num_beams)
        running = []
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_indices.tolist())):
            beam, token = divmod(index, vocab_size)
            if token == SEP:
                if rank < num_beams:
                    add(ids[beam].tolist(), score)
            else:
                running.append((beam, token, score))
            if len(running) == num_beams:
                break
        done = len(hypotheses) >= num_beams and min(s for s, _ in hypotheses) >= top_scores[0].item() / (
            (ids.shape[1] + 1) ** length_penalty
        )
        ids = torch.cat([ids[[beam for beam, _, _ in running]], torch.tensor([[t] for _, t, _ in running])], dim=1)
        beam_scores = torch.tensor([score for _, _, score in running])
        if done or ids.shape[1] >= max_length:
            break
    if not done:
        for row, score in zip(ids.tolist(), beam_scores.tolist()):
            add(row, score)
    score, best = max(hypotheses, key=lambda item: item[0])
    return best[1:], score


# ---- configuration, weights, save / load --------------------------------------------------------------------------


def test_generation_config_defaults(model):
    config = model.generation_config
    assert (config.num_beams, config.length_penalty, config.max_new_tokens) == (3, 0.6, 40)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (CLS, SEP, PAD)
    assert config.length_penalty_includes_prompt is True
    assert config.early_stopping is False


def test_lm_head_is_tied_to_the_word_embeddings(model):
    assert model.lm_head.decoder.weight is model.mico.text_model.embeddings.word_embeddings.weight


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_mico.MiCoForConditionalGeneration"
    )
    loaded = MiCoForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.decoder.weight is loaded.mico.text_model.embeddings.word_embeddings.weight
    assert loaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), MiCoForConditionalGeneration)
    inputs = knowledge_inputs("video")
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=6), model.generate(**inputs, max_new_tokens=6))


def test_loads_a_mico_model_checkpoint(tmp_path):
    torch.manual_seed(1)
    encoder = MiCoModel(tiny_config())
    encoder.save_pretrained(tmp_path)
    captioner = MiCoForConditionalGeneration.from_pretrained(tmp_path)
    embeddings = captioner.mico.text_model.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, encoder.text_model.embeddings.word_embeddings.weight)
    assert captioner.lm_head.decoder.weight is embeddings


# ---- decoding semantics ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["image", "video", "audio", "depth", "combined"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_decoding_agree(model, modality, num_beams):
    inputs = knowledge_inputs(modality)
    cached = model.generate(**inputs, num_beams=num_beams, max_new_tokens=12)
    uncached = model.generate(**inputs, num_beams=num_beams, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert (cached[:, 0] == CLS).all()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_the_recompute_everything_scheme(model, use_cache):
    inputs = knowledge_inputs("combined", batch_size=3)
    ids = model.generate(**inputs, num_beams=1, max_new_tokens=15, use_cache=use_cache)
    with torch.no_grad():
        expected = reference_greedy(model, model.mico.get_multimodal_context(**inputs), 15)
    assert strip(ids) == strip(expected)
    assert strip(ids)[0] != strip(ids)[1]  # the context matters


def test_batch_of_different_contexts(model):
    inputs = knowledge_inputs("video", batch_size=2, seed=5)
    for num_beams in (1, 3):
        batched = strip(model.generate(**inputs, num_beams=num_beams, max_new_tokens=8))
        single = [
            strip(model.generate(pixel_values_videos=video[None], num_beams=num_beams, max_new_tokens=8))[0]
            for video in inputs["pixel_values_videos"]
        ]
        assert batched == single


def test_question_prefix(model):
    """QA as in the original: the question (padded to a fixed length) is read bidirectionally, the answer is decoded
    causally after it from `[CLS]`."""
    inputs = knowledge_inputs("image", batch_size=2, seed=3)
    question = torch.tensor([[CLS, 7, 8, 9, SEP, PAD, PAD], [CLS, 20, 21, SEP, PAD, PAD, PAD]])
    mask = (question != PAD).long()
    ids = model.generate(**inputs, input_ids=question, attention_mask=mask, num_beams=1, max_new_tokens=8)
    assert torch.equal(ids[:, : question.shape[1] + 1], torch.cat([question, torch.full((2, 1), CLS)], dim=1))
    with torch.no_grad():
        expected = reference_greedy(model, model.mico.get_multimodal_context(**inputs), 8, question, mask)
    start = question.shape[1] + 1
    assert strip(ids, start) == strip(expected, start)
    for num_beams in (1, 3):
        kwargs = dict(input_ids=question, attention_mask=mask, num_beams=num_beams, max_new_tokens=8)
        assert torch.equal(model.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs, use_cache=False))
    # without an explicit mask, padding is inferred from [PAD]
    assert torch.equal(model.generate(**inputs, input_ids=question, num_beams=1, max_new_tokens=8), ids)


def test_precomputed_context(model):
    inputs = knowledge_inputs("audio")
    context = model.mico.get_multimodal_context(**inputs)
    assert torch.equal(model.generate(context=context, max_new_tokens=6), model.generate(**inputs, max_new_tokens=6))
    with pytest.raises(ValueError, match="either"):
        model.generate(context=context, **inputs)


def test_num_return_sequences(model):
    inputs = knowledge_inputs("video")
    beams = model.generate(**inputs, num_beams=3, num_return_sequences=3, max_new_tokens=8)
    assert beams.shape[0] == 6
    best = model.generate(**inputs, num_beams=3, max_new_tokens=8)
    assert strip(beams[::3]) == strip(best)
    samples = model.generate(**inputs, num_beams=1, do_sample=True, top_k=5, num_return_sequences=2, max_new_tokens=5)
    assert samples.shape[0] == 4


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=1),
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=3, question=True),
        dict(num_beams=1, do_sample=True, top_k=5, num_return_sequences=2),
    ],
    ids=["greedy", "beams", "return-sequences", "question", "sampling"],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_shared_context_equals_a_context_per_row(model, settings, use_cache):
    """One context per item, read by all its rows, gives the tokens of Transformers' generic path (the context copied
    per row, the whole cache reordered with the beams), cached or recomputed."""
    settings = dict(settings, max_new_tokens=8, use_cache=use_cache, **knowledge_inputs("combined", seed=4))
    if settings.pop("question", False):
        settings["input_ids"] = torch.tensor([[CLS, 7, 8, SEP, PAD], [CLS, 20, 21, 22, SEP]])
    torch.manual_seed(0)
    shared = model.generate(**settings)
    torch.manual_seed(0)
    with generic_decoding():
        per_row = model.generate(**settings)
    assert torch.equal(shared, per_row)


def test_context_keys_and_values_are_kept_once_per_item(model):
    """Beam search keeps the context's cross-attention keys/values once per item (not per beam): only the
    self-attention cache has a row per beam."""
    inputs = knowledge_inputs("video", batch_size=2)
    output = model.generate(**inputs, num_beams=3, max_new_tokens=6, return_dict_in_generate=True)
    context_length = model.mico.get_multimodal_context(**inputs).shape[1]
    for layer in range(model.config.text_config.num_hidden_layers):
        cross = output.cache.cross_attention_cache.layers[layer]
        assert cross.keys.shape[0] == cross.values.shape[0] == 2
        assert cross.keys.shape[2] == context_length
        assert output.cache.self_attention_cache.layers[layer].keys.shape[0] == 6
    with generic_decoding():  # Transformers' generic path copies them per beam
        output = model.generate(**inputs, num_beams=3, max_new_tokens=6, return_dict_in_generate=True)
    assert output.cache.cross_attention_cache.layers[0].keys.shape[0] == 6


def test_context_batch_must_divide_the_text_batch(model):
    context = model.mico.get_multimodal_context(**knowledge_inputs("image", batch_size=2))
    with pytest.raises(ValueError, match=r"the text batch \(3\) a multiple of items"):
        model(input_ids=torch.full((3, 2), CLS), context=context)
    rows = model(input_ids=torch.full((4, 2), CLS), context=context.repeat_interleave(2, dim=0)).logits
    shared = model(input_ids=torch.full((4, 2), CLS), context=context).logits
    torch.testing.assert_close(shared, rows, rtol=1e-5, atol=1e-5)


def test_streamer_receives_the_tokens(model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    ids = model.generate(**knowledge_inputs("image", batch_size=1), num_beams=1, max_new_tokens=6, streamer=streamer)
    assert streamer.chunks[0] == [CLS] and streamer.chunks[-1] == "end"
    assert [chunk[0] for chunk in streamer.chunks[1:-1]] == ids[0, 1:].tolist()


def test_stopping_criteria_and_pad_after_sep(model):
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    inputs = knowledge_inputs("video", batch_size=3, seed=2)
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=4)])
    assert model.generate(**inputs, num_beams=1, stopping_criteria=criteria).shape[1] <= 4
    bias = model.lm_head.decoder.bias
    original = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[SEP] += 5.0
        for num_beams in (1, 3):
            ids = model.generate(**inputs, num_beams=num_beams, max_new_tokens=20)
            for row in ids.tolist():
                if SEP in row:
                    assert set(row[row.index(SEP) + 1 :]) <= {PAD}
            assert any(SEP in row for row in ids.tolist())
    finally:
        with torch.no_grad():
            bias.copy_(original)


# ---- beam scoring of the release (Transformers 4.31) ---------------------------------------------------------------


@pytest.mark.parametrize(("sep_bias", "length_penalty"), [(0.0, 0.6), (3.5, 0.6), (3.5, 1.0), (5.0, 0.6)])
def test_beam_search_reproduces_transformers_4_31(model, sep_bias, length_penalty):
    inputs = knowledge_inputs("combined", batch_size=3, seed=11)
    bias = model.lm_head.decoder.bias
    original = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[SEP] += sep_bias
            contexts = model.mico.get_multimodal_context(**inputs)
            expected = [reference_beam_search_431(model, c[None], 3, 12, length_penalty) for c in contexts]
        for use_cache in (True, False):
            output = model.generate(
                **inputs,
                num_beams=3,
                max_new_tokens=12,
                length_penalty=length_penalty,
                use_cache=use_cache,
                return_dict_in_generate=True,
                output_scores=True,
            )
            assert strip(output.sequences) == [ids for ids, _ in expected]
            torch.testing.assert_close(output.sequences_scores, torch.tensor([s for _, s in expected]))
    finally:
        with torch.no_grad():
            bias.copy_(original)


def test_current_transformers_scoring_is_an_option(model):
    """`length_penalty_includes_prompt=False` normalises by the generated length ([SEP] included) as current
    Transformers do; the release rule counts the [CLS] prompt and not the [SEP]."""
    inputs = knowledge_inputs("combined", batch_size=3, seed=11)
    bias = model.lm_head.decoder.bias
    original = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[SEP] += 3.5
            contexts = model.mico.get_multimodal_context(**inputs)
            kwargs = dict(num_beams=3, max_new_tokens=4)  # the rules differ at the length limit
            release = model.generate(**inputs, **kwargs)
            current = model.generate(**inputs, **kwargs, length_penalty_includes_prompt=False)
            assert strip(release) != strip(current)  # the rules pick different beams here
            for includes_prompt in (True, False):
                output = model.generate(
                    **inputs,
                    num_beams=3,
                    max_new_tokens=4,
                    length_penalty_includes_prompt=includes_prompt,
                    return_dict_in_generate=True,
                    output_scores=True,
                )
                for context, row, score in zip(contexts, output.sequences, output.sequences_scores):
                    tokens = row[1:].tolist()
                    tokens = tokens[: tokens.index(SEP) + 1] if SEP in tokens else tokens
                    sum_logprobs = sum(
                        next_token_log_probs(model, torch.tensor([[CLS, *tokens[:step]]]), context[None])[0, token]
                        for step, token in enumerate(tokens)
                    )
                    length = len(tokens) + (1 if includes_prompt and tokens[-1] != SEP else 0)
                    torch.testing.assert_close(score, sum_logprobs / length**0.6, rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            bias.copy_(original)


def test_labels_loss_and_logits_to_keep(model):
    """`labels` are the tokens *at* each position (masked-LM loss through `self.loss_function`, no shift);
    `logits_to_keep` slices positions before the LM head."""
    inputs = knowledge_inputs("image")
    ids = torch.tensor([[CLS, 7, 8, MASK], [CLS, 9, MASK, PAD]])
    mask = (ids != PAD).long()
    labels = torch.tensor([[-100, -100, -100, 11], [-100, -100, 12, -100]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **inputs)
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **inputs).logits
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(last, out.logits[:, -1:])


def test_flash_attention_limits_are_explicit(model):
    """flash-attention kernels take a padding mask and a causal flag only: a question prefix read bidirectionally
    inside the causal mask, and explicit 3-D masks, are refused with the reason (checked before any kernel runs)."""
    text_model = model.mico.text_model
    original = text_model.config._attn_implementation
    text_model.config._attn_implementation = "flash_attention_2"
    try:
        ids = torch.tensor([[CLS, 7, 8]])
        with pytest.raises(ValueError, match="cannot express a bidirectional prefix inside a causal mask"):
            text_model(input_ids=ids, is_causal=True, prefix_length=2)
        with pytest.raises(ValueError, match="cannot take an explicit 3-D attention mask"):
            text_model(input_ids=ids, attention_mask=torch.ones(1, 3, 3).tril())
    finally:
        text_model.config._attn_implementation = original


# Private methods of GenerationMixin that MiCoGenerationMixin / MiCoForConditionalGeneration override or call, with
# the parameters the overrides rely on, for the supported Transformers range (pyproject: transformers>=5.0,<6).
PINNED_GENERATION_API = {
    "_prepare_generation_config": ["self", "generation_config"],
    "_prepare_cache_for_generation": [
        "self",
        "generation_config",
        "model_kwargs",
        "generation_mode",
        "batch_size",
        "max_cache_length",
    ],
    "_beam_search": ["self", "input_ids", "logits_processor", "stopping_criteria", "generation_config", "synced_gpus"],
    "_update_finished_beams": [
        "self",
        "sequences",
        "topk_running_sequences",
        "beam_scores",
        "topk_log_probs",
        "beam_indices",
        "topk_running_beam_indices",
        "is_early_stop_heuristic_unsatisfied",
        "is_sent_finished",
        "next_token_hits_stopping_criteria",
        "top_num_beam_mask",
        "num_beams",
        "cur_len",
        "decoder_prompt_len",
        "length_penalty",
        "early_stopping",
    ],
    "_check_early_stop_heuristic": [  # a staticmethod in 5.x
        "is_early_stop_heuristic_unsatisfied",
        "running_beam_scores",
        "beam_scores",
        "is_sent_finished",
        "cur_len",
        "max_length",
        "decoder_prompt_len",
        "early_stopping",
        "length_penalty",
    ],
    "_update_model_kwargs_for_generation": ["self", "outputs", "model_kwargs"],
    "_gather_beams": ["tensor", "beam_indices"],
}


def test_overridden_generation_internals_match_the_supported_transformers():
    """The release's beam scoring overrides private GenerationMixin methods: an upgrade that renames them or changes
    their parameters must fail here rather than silently fall back to another scoring."""
    import inspect

    import transformers
    from packaging.version import Version
    from transformers import GenerationMixin

    assert Version("5.0") <= Version(transformers.__version__) < Version("6"), transformers.__version__
    for name, expected in PINNED_GENERATION_API.items():
        method = getattr(GenerationMixin, name, None)
        assert method is not None, f"GenerationMixin.{name} is gone"
        parameters = [
            p.name
            for p in inspect.signature(method).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        assert parameters[: len(expected)] == expected, f"GenerationMixin.{name}{inspect.signature(method)}"
    # the hooks are reached: GenerationMixin's beam search calls the two scoring methods
    source = inspect.getsource(GenerationMixin._beam_search)
    assert "self._update_finished_beams(" in source and "self._check_early_stop_heuristic(" in source


# ---- captioning CLI -------------------------------------------------------------------------------------------------


def test_run_captioning_cli(tmp_path):
    from examples.run_captioning import main
    from modeling_mico import MiCoProcessor

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    MiCoForConditionalGeneration(tiny_config(image_size=224)).save_pretrained(model_dir)
    MiCoProcessor().save_pretrained(model_dir)
    output = tmp_path / "captions.jsonl"
    main(
        [
            "--model_name_or_path",
            str(model_dir),
            "--inputs",
            str(MEDIA),
            "--output_file",
            str(output),
            "--batch_size",
            "2",
            "--num_beams",
            "1",
            "--max_new_tokens",
            "4",
            "--num_frames",
            "2",
        ]
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(record["modality"] for record in records) == ["audio", "image", "video"]
    assert all(isinstance(record["caption"], str) for record in records)


# ---- parity with the original code ----------------------------------------------------------------------------------

PARITY_CONTEXTS = {
    "video": ["in_pixel_values_video"],
    "audio": ["in_input_features_audio"],
    "va": ["in_pixel_values_video", "in_input_features_audio"],
}
INPUT_NAMES = {"in_pixel_values_video": "pixel_values_videos", "in_input_features_audio": "input_features"}
PARITY_CONTEXT_CACHE: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def parity_model():
    return MiCoForConditionalGeneration.from_pretrained(PARITY / "hub").eval()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("context", list(PARITY_CONTEXTS))
def test_captions_of_the_original_code(parity_model, context, num_beams, use_cache):
    reference = np.load(PARITY / "reference_outputs.npz")
    if context not in PARITY_CONTEXT_CACHE:  # the ViT runs once per context for the whole module
        inputs = {INPUT_NAMES[name]: torch.from_numpy(reference[name]) for name in PARITY_CONTEXTS[context]}
        PARITY_CONTEXT_CACHE[context] = parity_model.mico.get_multimodal_context(**inputs)
    ids = parity_model.generate(
        context=PARITY_CONTEXT_CACHE[context], num_beams=num_beams, max_new_tokens=40, use_cache=use_cache
    )
    assert strip(ids) == strip(torch.from_numpy(reference[f"cap_ids_{context}_beam{num_beams}"]))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_answers_of_the_original_code(parity_model, num_beams):
    from modeling_mico.processing_mico import load_default_tokenizer

    reference = np.load(PARITY / "reference_outputs.npz")
    qa = json.loads((PARITY / "captions.json").read_text())["qa_tv"]
    tokenizer = load_default_tokenizer()
    questions = tokenizer(
        [q for item in qa["questions"] for q in item],
        padding="max_length",
        truncation=True,
        max_length=40,
        return_tensors="pt",
    )
    context = parity_model.mico.get_multimodal_context(
        pixel_values_videos=torch.from_numpy(reference["in_pixel_values_video"])
    )
    context = torch.cat([context[i : i + 1].expand(len(item), -1, -1) for i, item in enumerate(qa["questions"])])
    ids = parity_model.generate(
        input_ids=questions.input_ids,
        attention_mask=questions.attention_mask,
        context=context,
        num_beams=num_beams,
        max_new_tokens=10,
        length_penalty=1.0,
    )
    answers = tokenizer.batch_decode(ids[:, 41:], skip_special_tokens=True)
    assert answers == qa["answers"][f"beam{num_beams}"]
