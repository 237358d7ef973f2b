"""diffusmith: run and fine-tune flow-matching diffusion transformers.

Training reuses the inference pipeline: the same units, with the scheduler in training mode."""

from .core.attention import set_attention_backend
from .errors import DiffusmithError
from .pipelines.base import BasePipeline, PipelineUnit

__all__ = ["BasePipeline", "DiffusmithError", "PipelineUnit", "QwenImagePipeline", "set_attention_backend"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # model families load lazily: `import diffusmith` stays fast and needs no model code
    if name == "QwenImagePipeline":
        from .pipelines.qwen_image import QwenImagePipeline

        return QwenImagePipeline
    raise AttributeError(f"module 'diffusmith' has no attribute {name!r}")
