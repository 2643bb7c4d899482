"""Transformers models built from a config (on the meta device: nothing allocated), for the
state-size estimates of :mod:`hfoptim.memory`. ``transformers`` is imported on use."""

from __future__ import annotations

import torch


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
