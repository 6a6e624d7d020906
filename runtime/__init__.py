"""Runtime: continuously batched generation and embeddings on top of transformers.

load_tokenizer(folder)                      the tokenizer of a converted model folder
model_class_for(folder, task)               the transformers class to build for a task
pooling_config(folder)                      sentence-transformers pooling of an embedder
SamplingParams.from_request(body, ...)      validated sampling fields of a request
GrammarSpec, Grammars                       structured output: the spec, a model's compiler
Sampler, Pick                               one sequence's token picker and what it picked
Runtime(model, tokenizer, folder, ...)      a model instance: encode, start, resume, embed
Generation                                  one running generation: step, export, pause, resume
"""

from ._embed import PoolingConfig, pooling_config
from ._formats import GrammarSpec
from ._generation import Generation, TokenEvent
from ._grammar import Grammars
from ._models import load_tokenizer, model_class_for
from ._params import MAX_N, SamplingParams, choices_field
from ._runtime import Runtime
from ._sampling import Pick, Sampler

__all__ = [
    "MAX_N",
    "Generation",
    "GrammarSpec",
    "Grammars",
    "Pick",
    "PoolingConfig",
    "Runtime",
    "Sampler",
    "SamplingParams",
    "TokenEvent",
    "choices_field",
    "load_tokenizer",
    "model_class_for",
    "pooling_config",
]
