"""Runtime: continuously batched generation and embeddings on top of transformers.

load_tokenizer(folder)                      the tokenizer of a converted model folder
model_class_for(folder, task)               the transformers class to build for a task
pooling_config(folder)                      sentence-transformers pooling of an embedder
SamplingParams.from_request(body, ...)      validated sampling fields of a request
Runtime(model, tokenizer, folder, ...)      a model instance: encode, start, resume, embed
Generation                                  one running generation: step, export, pause, resume
"""

from ._embed import PoolingConfig, pooling_config
from ._generation import Generation, TokenEvent
from ._models import load_tokenizer, model_class_for
from ._params import SamplingParams
from ._runtime import Runtime

__all__ = [
    "Generation",
    "PoolingConfig",
    "Runtime",
    "SamplingParams",
    "TokenEvent",
    "load_tokenizer",
    "model_class_for",
    "pooling_config",
]
