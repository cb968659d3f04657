"""Supported architectures, keyed by the `model_type` of a checkpoint's config.json."""

from mm_runtime.gpu_worker.models.base import MultimodalModel
from mm_runtime.gpu_worker.models.llava import LlavaModel
from mm_runtime.gpu_worker.models.qwen2_vl import Qwen2VLModel

MODEL_CLASSES: dict[str, type[MultimodalModel]] = {
    "llava": LlavaModel,
    "qwen2_vl": Qwen2VLModel,
}
