"""MiCo (arXiv 2406.09412) for Hugging Face Transformers.

Importing this package registers every MiCo class with the matching Auto class, so that
`AutoConfig`, `AutoModel`, `AutoProcessor` and friends load MiCo directories, and lets them load checkpoints of the
original research code too (converted on the fly by `modeling_mico.convert_original`).

Only the configuration, model, processor and conversion modules are imported here; the training and evaluation
modules (`data`, `evaluation`, `retrieval`, ...) are imported on first attribute access (`modeling_mico.data`), and
optional back-ends (`decord`, `soundfile`, `av`, `matplotlib`) only by the features that need them.
"""

# The MiCo classes imported below are the package's public names; `__all__` is built from them.
# ruff: noqa: F401

import importlib
from types import ModuleType

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVideoClassification,
    AutoModelForZeroShotImageClassification,
)

from .configuration_mico import MiCoConfig, MiCoTextConfig, MiCoVisionConfig
from .convert_original import install_original_checkpoint_support
from .ecosystem import save_hook
from .feature_extraction_mico import MiCoFeatureExtractor
from .image_processing_mico import MiCoImageProcessor
from .modeling_mico import (
    MiCoForAudioClassification,
    MiCoForConditionalGeneration,
    MiCoForDepthClassification,
    MiCoForImageClassification,
    MiCoForPreTraining,
    MiCoForPreTrainingOutput,
    MiCoForVideoClassification,
    MiCoForZeroShotClassification,
    MiCoModel,
    MiCoPreTrainedModel,
    MiCoTextModel,
    MiCoVisionModel,
)
from .pipelines_mico import register_pipelines
from .processing_mico import MiCoProcessor, register_processing_auto_classes
from .video_processing_mico import MiCoVideoProcessor


def _register_auto_classes() -> None:
    """Register configs and models with the Auto classes, and for `auto_map` (remote code) on save."""
    for config_class in (MiCoConfig, MiCoVisionConfig, MiCoTextConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    MiCoConfig.register_for_auto_class()
    AutoModel.register(MiCoConfig, MiCoModel, exist_ok=True)
    AutoModel.register(MiCoVisionConfig, MiCoVisionModel, exist_ok=True)
    AutoModel.register(MiCoTextConfig, MiCoTextModel, exist_ok=True)
    MiCoModel.register_for_auto_class("AutoModel")
    AutoModelForPreTraining.register(MiCoConfig, MiCoForPreTraining, exist_ok=True)
    MiCoForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    AutoModelForImageTextToText.register(MiCoConfig, MiCoForConditionalGeneration, exist_ok=True)
    MiCoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    AutoModelForZeroShotImageClassification.register(MiCoConfig, MiCoForZeroShotClassification, exist_ok=True)
    MiCoForZeroShotClassification.register_for_auto_class("AutoModelForZeroShotImageClassification")
    classification = {
        AutoModelForImageClassification: MiCoForImageClassification,
        AutoModelForVideoClassification: MiCoForVideoClassification,
        AutoModelForAudioClassification: MiCoForAudioClassification,
    }
    for auto_class, model_class in classification.items():
        auto_class.register(MiCoConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    register_processing_auto_classes()
    register_pipelines()
    if save_hook not in MiCoPreTrainedModel.save_hooks:
        MiCoPreTrainedModel.save_hooks.append(save_hook)
    install_original_checkpoint_support(
        AutoModel, AutoModelForPreTraining, AutoModelForImageTextToText, *classification
    )


_register_auto_classes()

# Modules of the package that are not needed to load a model or a processor: imported on first access.
_LAZY_SUBMODULES = (
    "annotations",
    "caption_metrics",
    "captioning",
    "convert_original",
    "data",
    "distributed",
    "evaluation",
    "finetuning",
    "import_utils",
    "peft_utils",
    "retrieval",
    "search",
    "synthetic_data",
    "zero_shot",
    "trainer_mico",
)


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The public names are the MiCo classes imported above (configurations, processors, models).
__all__ = sorted(name for name in dict(globals()) if name.startswith("MiCo"))
