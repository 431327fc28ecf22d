"""sentence-transformers support: `SentenceTransformer(<MiCo directory>, trust_remote_code=True)` encodes text,
images, audio, videos and videos with their sound into MiCo's normalised contrastive space.

`MiCoSentenceEncoder` is a sentence-transformers input module that wraps a `MiCoModel` and its `MiCoProcessor`.
sentence-transformers tells inputs apart by type (strings are text unless they are image / video / audio paths, PIL
images, `{"array", "sampling_rate"}` dicts, `{"video": ..., "audio": ...}` dicts); each modality goes through its
own projection head, a video with its sound through the fused `va` head. Embeddings are L2-normalised, so
sentence-transformers' cosine similarity equals the dot products `MiCoModel` scores with (before the temperature).

`modeling_mico.ecosystem.add_ecosystem_files(directory)` writes the files sentence-transformers reads
(`modules.json`, `config_sentence_transformers.json`) and this module into a saved MiCo directory; after `import
modeling_mico` every `save_pretrained` of a MiCo model does. The module imports only sentence-transformers, Transformers and torch, so
that it runs as the checkpoint's remote code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.base.modality import infer_batch_modality
from sentence_transformers.base.modules.input_module import InputModule
from transformers import AutoModel, AutoProcessor


# sentence-transformers modality -> MiCo registry modality names (a tuple modality is a fused input).
MODALITIES = ["text", "image", "audio", "video", ("audio", "video")]


class MiCoSentenceEncoder(InputModule):
    """Input module: preprocesses a batch of one modality with the MiCo processor and writes the normalised MiCo
    embedding to `sentence_embedding`."""

    save_in_root = True

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__()
        self.model = model
        self.processor = processor

    @property
    def modalities(self) -> list:
        return list(MODALITIES)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @classmethod
    def load(cls, model_name_or_path: str, trust_remote_code: bool = False, **kwargs: Any) -> MiCoSentenceEncoder:
        """The model (`AutoModel`) and processor (`AutoProcessor`) saved in `model_name_or_path`."""
        hub = {key: kwargs[key] for key in ("token", "revision", "local_files_only") if kwargs.get(key) is not None}
        if kwargs.get("cache_folder"):
            hub["cache_dir"] = kwargs["cache_folder"]
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, **hub).eval()
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, **hub)
        return cls(model, processor)

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.processor.save_pretrained(output_path)

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Processor outputs of a batch of one modality (sentence-transformers refuses mixed batches)."""
        modality = infer_batch_modality(inputs, supported_modalities=self.modalities)
        if modality == "text":
            texts = [prompt + text for text in inputs] if prompt else list(inputs)
            features = dict(self.processor(text=texts, return_tensors="pt"))
        elif isinstance(modality, tuple):
            features = dict(
                self.processor(
                    videos=[item["video"] for item in inputs],
                    audio=[item["audio"] for item in inputs],
                    return_tensors="pt",
                )
            )
        else:
            argument = {"image": "images", "video": "videos", "audio": "audio"}[modality]
            values = [item[modality] if isinstance(item, dict) and modality in item else item for item in inputs]
            features = dict(self.processor(**{argument: values}, return_tensors="pt"))
        features["modality"] = modality
        return features

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        modality = features["modality"]
        model = self.model
        if modality == "text":
            output = model.get_text_features(features["input_ids"], features["attention_mask"])
        elif isinstance(modality, tuple):
            output = model.get_fused_features(
                pixel_values_videos=features["pixel_values_videos"], input_features=features["input_features"]
            )
        else:
            spec = model.config.modality_specs[modality]
            output = model.get_modality_features(modality, features[spec.input_name].to(model.dtype))
        features["sentence_embedding"] = F.normalize(output.pooler_output, dim=-1)
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.projection_dim


__all__ = ["MiCoSentenceEncoder"]
