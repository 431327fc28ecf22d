"""Captioning through pipelines: Transformers' `image-text-to-text` (with `text=""`) and the shipped `video-to-text`,
`audio-to-text` and `multimodal-to-text` pipelines give exactly the tokens of `MiCoForConditionalGeneration.generate`
(and the captions of `caption_files`) with the same generation settings, after `import modeling_mico` and as remote
code in a fresh interpreter without the package."""

import json
from pathlib import Path

import pytest
import torch
from test_loading import BLOCK_PACKAGE, run_python
from transformers import pipeline

from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoModel, MiCoProcessor
from modeling_mico.captioning import caption_files
from modeling_mico.pipelines_mico import CAPTIONING_TASKS, MiCoCaptioningPipeline


MEDIA = Path(__file__).resolve().parent / "fixtures" / "media"
IMAGE, AUDIO, VIDEO = str(MEDIA / "test.jpeg"), str(MEDIA / "test.flac"), str(MEDIA / "test.mp4")
SHORT = {"max_new_tokens": 6}  # short captions keep the tests fast; the default settings are checked once
QUESTION = "what is in it?"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny captioner and its processor saved in one directory (the save ships the custom pipelines); captions
    of at most 12 tokens keep the default settings (3 beams, `max_caption_length` new tokens) fast."""
    directory = tmp_path_factory.mktemp("captioning") / "tiny"
    torch.manual_seed(0)
    config = MiCoConfig.from_preset("tiny", max_caption_length=12)
    MiCoForConditionalGeneration(config).eval().save_pretrained(directory)
    MiCoProcessor.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(saved) -> MiCoForConditionalGeneration:
    return MiCoForConditionalGeneration.from_pretrained(saved).eval()


@pytest.fixture(scope="module")
def processor(saved) -> MiCoProcessor:
    return MiCoProcessor.from_pretrained(saved)


def own_tokens(model, processor, text: str | None = None, **media) -> list[int]:
    """The model's own generated ids for one item (`media` keyed by processor argument)."""
    inputs = processor(text=text, **{argument: [value] for argument, value in media.items()})
    return model.generate(**inputs, **SHORT)[0].tolist()


def test_empty_prompt_with_media_is_no_prefix(processor):
    inputs = processor(text="", images=[IMAGE])
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (1, 0)
    assert inputs["input_ids"].dtype == torch.long
    assert processor(text=["", ""], videos=[VIDEO, VIDEO])["input_ids"].shape == (2, 0)
    # without media an empty text is still a text ([CLS] [SEP]), as retrieval embeds it
    assert processor(text="")["input_ids"][0, :2].tolist() == [101, 102]


def test_image_text_to_text_gives_the_models_own_caption(saved, model, processor):
    """Default generation settings (the release's 3 beams, `max_caption_length` new tokens), not the pipeline's."""
    captioner = pipeline("image-text-to-text", model=str(saved))
    expected = model.generate(**processor(images=[IMAGE]))[0]
    (tokens,) = captioner(IMAGE, text="", return_tensors=True)
    assert tokens["generated_token_ids"].tolist() == expected.tolist()
    (caption,) = caption_files(model, processor, [IMAGE], progress=False)
    assert captioner(IMAGE, text="") == [{"input_text": "", "generated_text": caption["caption"]}]
    assert captioner(IMAGE, text="", return_full_text=False)[0]["generated_text"] == caption["caption"]


def test_image_text_to_text_reads_a_question_as_micos_prefix(saved, model, processor):
    captioner = pipeline("image-text-to-text", model=str(saved))
    expected = own_tokens(model, processor, text=QUESTION, images=IMAGE)
    (tokens,) = captioner(IMAGE, text=QUESTION, return_tensors=True, generate_kwargs=SHORT)
    assert tokens["generated_token_ids"].tolist() == expected
    prefix = processor(text=QUESTION)["input_ids"].shape[1]
    answer = processor.decode(expected[prefix:])
    (result,) = captioner(IMAGE, text=QUESTION, return_full_text=False, generate_kwargs=SHORT)
    assert result["generated_text"].strip() == answer


@pytest.mark.parametrize(
    ("task", "item", "media"),
    [
        ("video-to-text", VIDEO, {"videos": VIDEO}),
        ("audio-to-text", AUDIO, {"audio": AUDIO}),
        ("video-to-text", {"video": VIDEO, "audio": AUDIO}, {"videos": VIDEO, "audio": AUDIO}),
        ("multimodal-to-text", {"depth": IMAGE}, {"depth": IMAGE}),
    ],
)
def test_captioning_pipelines_give_the_models_own_tokens(saved, model, processor, task, item, media):
    captioner = pipeline(task, model=str(saved), trust_remote_code=True)
    assert type(captioner).__name__ == MiCoCaptioningPipeline.__name__  # the checkpoint's copy of the class
    expected = own_tokens(model, processor, **media)
    (tokens,) = captioner(item, return_tensors=True, **SHORT)
    assert tokens["generated_token_ids"].tolist() == expected
    assert captioner(item, **SHORT) == [{"generated_text": processor.decode(expected).strip()}]


def test_captioning_pipelines_match_caption_files(model, processor):
    """On a model object after `import modeling_mico` (no remote code), with the default settings."""
    captions = {row["path"]: row["caption"] for row in caption_files(model, processor, [VIDEO, AUDIO], progress=False)}
    assert pipeline("video-to-text", model=model, processor=processor)(VIDEO)[0]["generated_text"] == captions[VIDEO]
    assert pipeline("audio-to-text", model=model, processor=processor)(AUDIO)[0]["generated_text"] == captions[AUDIO]


def test_captioning_pipeline_questions_and_returned_sequences(model, processor):
    captioner = pipeline("video-to-text", model=model, processor=processor)
    expected = own_tokens(model, processor, text=QUESTION, videos=VIDEO)
    (tokens,) = captioner(VIDEO, question=QUESTION, return_tensors=True, **SHORT)
    assert tokens["generated_token_ids"].tolist() == expected
    prefix = processor(text=QUESTION)["input_ids"].shape[1]
    assert captioner(VIDEO, question=QUESTION, **SHORT) == [{"generated_text": processor.decode(expected[prefix:])}]
    several = captioner(VIDEO, generate_kwargs={"num_return_sequences": 2, **SHORT})
    direct = model.generate(**processor(videos=[VIDEO]), num_return_sequences=2, **SHORT)
    assert [row["generated_text"] for row in several] == [text.strip() for text in processor.batch_decode(direct)]


def test_captioning_pipeline_refuses_bad_arguments(model, processor):
    captioner = pipeline("video-to-text", model=model, processor=processor)
    with pytest.raises(ValueError, match="question must be a non-empty string, got ''"):
        captioner(VIDEO, question="")
    with pytest.raises(TypeError, match=r"MiCoCaptioningPipeline got unexpected arguments \['candidate_labels'\]"):
        captioner(VIDEO, candidate_labels=["a dog"])
    with pytest.raises(ValueError, match="video-to-text needs a captioning model .* got MiCoModel"):
        pipeline("video-to-text", model=MiCoModel(model.config), processor=processor)
    multimodal = pipeline("multimodal-to-text", model=model, processor=processor)
    with pytest.raises(ValueError, match=r"say which modality the input is: modality=\.\.\."):
        multimodal(IMAGE)
    with pytest.raises(ValueError, match=r"input dict keys must be modalities of this processor .* got \['smell'\]"):
        multimodal({"smell": IMAGE})


def test_checkpoint_ships_the_captioning_pipelines(saved):
    shipped = json.loads((saved / "config.json").read_text())["custom_pipelines"]
    for task in CAPTIONING_TASKS:
        assert shipped[task] == {
            "impl": "pipelines_mico.MiCoCaptioningPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }


@pytest.mark.slow
def test_remote_code_captioning_without_the_package(saved, model, processor, tmp_path):
    expected = {
        "image": own_tokens(model, processor, images=IMAGE),
        "video": own_tokens(model, processor, videos=VIDEO),
        "audio": own_tokens(model, processor, audio=AUDIO),
        "va": own_tokens(model, processor, videos=VIDEO, audio=AUDIO),
    }
    script = f"""
        import json
        from transformers import pipeline
        directory, options = {str(saved)!r}, {SHORT!r}
        image = pipeline("image-text-to-text", model=directory, trust_remote_code=True)
        video = pipeline("video-to-text", model=directory, trust_remote_code=True)
        audio = pipeline("audio-to-text", model=directory, trust_remote_code=True)
        for captioner in (image, video, audio):
            assert type(captioner.model).__module__.startswith("transformers_modules"), type(captioner.model)
        tokens = {{
            "image": image({IMAGE!r}, text="", return_tensors=True, generate_kwargs=options),
            "video": video({VIDEO!r}, return_tensors=True, **options),
            "audio": audio({AUDIO!r}, return_tensors=True, **options),
            "va": video({{"video": {VIDEO!r}, "audio": {AUDIO!r}}}, return_tensors=True, **options),
        }}
        print(json.dumps({{name: rows[0]["generated_token_ids"].tolist() for name, rows in tokens.items()}}))
    """
    result = run_python(BLOCK_PACKAGE, script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_caption_files_builds_the_decoding_weights_once(model, processor, monkeypatch):
    """`caption_files` decodes inside `keep_decoding_weights`: the first batch builds the fused and prepacked weights
    (3 beams by default), the next batches reuse them, and nothing is kept afterwards."""
    from test_performance import recorded_products, unfused_linears

    from modeling_mico import modeling_mico_text

    built = recorded_products(monkeypatch)
    records = caption_files(model, processor, [VIDEO, VIDEO, VIDEO], batch_size=1, progress=False, **SHORT)
    assert len(records) == 3 and len({record["caption"] for record in records}) == 1
    attention_modules = 2 * model.config.text_config.num_hidden_layers
    assert built == [True] * (attention_modules + len(unfused_linears(model)))
    assert not any(module in modeling_mico_text._KEPT_PRODUCTS for module in model.modules())
