"""Model configs by name and models built from a config (with no weights downloaded).

* ``"tiny-llama"`` (:data:`TINY_LLAMA`): a small Llama-style causal-LM config, about 1M
  parameters (:func:`tiny_llama_config`), accepted wherever a model name is
  (``hfoptim memory tiny-llama``, the recipes' ``--config_name``);
* :data:`LLAMA_2_7B`: the public shapes of Llama-2-7B, to show what state bytes mean at scale;
* :func:`load_config` reads a config by name, folder or hub name; :func:`model_class_for` picks
  the transformers class a config is for; :func:`model_from_config` builds a model from a config
  with random weights (on the meta device it allocates nothing).
"""

from __future__ import annotations

import torch

#: the name of the small Llama config wherever a model name or path is accepted
TINY_LLAMA = "tiny-llama"
#: the vocabulary of :func:`tiny_llama_config` without a tokenizer
TINY_LLAMA_VOCAB_SIZE = 2048

#: Llama-2-7B's public shapes (``LlamaConfig(**LLAMA_2_7B)``; 6.74B parameters)
LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
)


def tiny_llama_config(
    vocab_size: int = TINY_LLAMA_VOCAB_SIZE,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 352,
    max_position_embeddings: int = 512,
    tokenizer=None,
    **overrides,
):
    """A small Llama-style config (about 1M parameters at the defaults). With ``tokenizer`` the
    vocabulary and special-token ids follow it; without, token 0 is BOS and EOS and token 1 pads."""
    from transformers import LlamaConfig

    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    else:
        ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **ids,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def load_config(name_or_path: str, **kwargs):
    """A model config: ``"tiny-llama"`` (:func:`tiny_llama_config`), a local folder or a hub name."""
    if name_or_path == TINY_LLAMA:
        return tiny_llama_config(**kwargs)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def model_class_for(config):
    """The transformers class a config is for: the first of its ``architectures`` that
    transformers has; else, by the Auto mappings, a causal LM for a decoder config (GPT-2, Llama,
    Mixtral, ...; not an encoder that merely has an LM-head variant, such as BERT without
    ``is_decoder``), a seq2seq LM for an encoder-decoder (T5), an image classifier for a vision
    config (ViT), and ``AutoModel`` (the bare model) otherwise."""
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSeq2SeqLM,
    )
    from transformers.models.auto import modeling_auto as auto

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    kind = config.model_type  # the mappings by name: nothing is imported to decide
    masked = kind in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False) and kind in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForSeq2SeqLM
    if kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (getattr(config, "is_decoder", False) or not masked):
        return AutoModelForCausalLM
    if kind in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForImageClassification
    return AutoModel


def model_from_config(config, device: str | None = None, dtype: torch.dtype | None = None, model_class=None):
    """A randomly initialised model for ``config`` (``device="meta"`` allocates nothing), of
    ``model_class`` (a transformers class or Auto class) or :func:`model_class_for` the config."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    cls = model_class or model_class_for(config)
    with torch.device(device or "cpu"):
        if hasattr(cls, "_from_config"):  # a model class (PreTrainedModel)
            return cls._from_config(config, **kwargs)
        return cls.from_config(config, **kwargs)
