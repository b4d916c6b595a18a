"""Text generation: KV cache, sampling, batched decoding, beam search and speculative decoding."""

from llm.generate.beam import beam_search
from llm.generate.cache import KVCache, LayerCache
from llm.generate.decode import generate
from llm.generate.sampling import filter_logits, mask_padded_vocab, probabilities, sample, top_k_filter, top_p_filter
from llm.generate.speculative import SpeculativeStats, speculative_generate

__all__ = [
    "KVCache",
    "LayerCache",
    "SpeculativeStats",
    "beam_search",
    "filter_logits",
    "generate",
    "mask_padded_vocab",
    "probabilities",
    "sample",
    "speculative_generate",
    "top_k_filter",
    "top_p_filter",
]
