"""sentence-transformers on a saved MiCo directory: every modality (and a video with its sound) encodes into the
model's own normalised space, so similarities equal `MiCoModel`'s within 1e-5, also without the package."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from test_loading import BLOCK_PACKAGE, run_python
from test_pipelines import save_tiny

from modeling_mico import MiCoModel, MiCoProcessor


MEDIA = Path(__file__).resolve().parent / "fixtures" / "media"
IMAGE, AUDIO, VIDEO = str(MEDIA / "test.jpeg"), str(MEDIA / "test.flac"), str(MEDIA / "test.mp4")
TEXTS = ["a dog barking", "a cat", "rain on a window"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("sentence") / "tiny")


@pytest.fixture(scope="module")
def expected(saved) -> dict[str, torch.Tensor]:
    """Normalised embeddings from `MiCoModel` itself, per modality."""
    model, processor = MiCoModel.from_pretrained(saved).eval(), MiCoProcessor.from_pretrained(saved)
    with torch.no_grad():
        output = model(**processor(text=TEXTS), **processor(images=[IMAGE]))
        audio = model(**processor(audio=[AUDIO])).audio_embeds
        video = model(**processor(videos=[VIDEO])).video_embeds
        fused = model.get_fused_features(**processor(videos=[VIDEO], audio=[AUDIO])).pooler_output
    return {
        "text": output.text_embeds,
        "image": output.image_embeds,
        "audio": audio,
        "video": video,
        "va": F.normalize(fused, dim=-1),
    }


def test_similarities_equal_the_models(saved, expected):
    encoder = SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
    assert encoder.get_embedding_dimension() == expected["text"].shape[1]
    text = encoder.encode(TEXTS, convert_to_tensor=True)
    media = {
        "image": encoder.encode([IMAGE], convert_to_tensor=True),
        "audio": encoder.encode([AUDIO], convert_to_tensor=True),
        "video": encoder.encode([VIDEO], convert_to_tensor=True),
        "va": encoder.encode([{"video": VIDEO, "audio": AUDIO}], convert_to_tensor=True),
    }
    for name, embeddings in media.items():
        similarity = encoder.similarity(text, embeddings)
        torch.testing.assert_close(similarity, expected["text"] @ expected[name].t(), atol=1e-5, rtol=0)


def test_mixed_batches_are_refused(saved):
    encoder = SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match="Encode each modality separately"):
        encoder.encode(["a dog", IMAGE], batch_size=8)


@pytest.mark.slow
def test_sentence_transformers_loads_without_the_package(saved, expected, tmp_path):
    script = f"""
        import json
        from sentence_transformers import SentenceTransformer
        encoder = SentenceTransformer({str(saved)!r}, trust_remote_code=True, device="cpu")
        text = encoder.encode({TEXTS!r}, convert_to_tensor=True)
        video = encoder.encode([{VIDEO!r}], convert_to_tensor=True)
        print(json.dumps(encoder.similarity(text, video).tolist()))
    """
    result = run_python(BLOCK_PACKAGE, script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    similarity = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(similarity, expected["text"] @ expected["video"].t(), atol=1e-5, rtol=0)
