"""Causal-LM pretraining and continued pretraining with any hfoptim optimizer.

With no data or model arguments it pretrains the embedded default: a small Llama built from a
config, a byte-level BPE tokenizer trained on the spot, on the Python standard library's own
source (nothing is downloaded). Every ``TrainingArguments`` flag works, and ``--optim`` takes any
hfoptim name with typed ``--optim_args``:

    python recipes/pretrain_clm.py --output_dir outputs/pretrain --optim ademamix_8bit \\
        --optim_args "t_alpha=auto,t_beta3=auto" --max_steps 200 --per_device_train_batch_size 16 \\
        --learning_rate 3e-3 --eval_strategy steps --eval_steps 50

    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml recipes/pretrain_clm.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B --train_file my_corpus/ --output_dir outputs/cpt ...

Writes the model, tokenizer and checkpoints to ``--output_dir`` with ``train_results.json``,
``eval_results.json`` (validation ``eval_loss`` and ``perplexity``) and ``all_results.json``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    DataArguments,
    ModelArguments,
    Trainer,
    finish,
    last_checkpoint,
    load_model,
    load_records,
    load_tokenizer,
    logger,
    parse_args,
    shutdown,
)
from transformers import default_data_collator  # noqa: E402

from hfoptim.app.corpus import BlockDataset, corpus_token_ids, stdlib_corpus, tokenize_documents  # noqa: E402


@dataclass
class PretrainArguments:
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})


def build_datasets(data_args: DataArguments, pre_args: PretrainArguments, tokenizer, training_args):
    """Token blocks for training and validation."""
    records = load_records(data_args, training_args)
    with training_args.main_process_first(desc="tokenizing"):
        if records is None:
            corpus = stdlib_corpus(data_args.embedded_max_bytes)
            train_ids = corpus_token_ids(tokenizer, "train", corpus)
            val_ids = corpus_token_ids(tokenizer, "validation", corpus)
            logger.info(
                "embedded corpus: %d train / %d validation files", len(corpus.train_files), len(corpus.validation_files)
            )
        else:
            train, validation = records
            column = data_args.text_column
            train_ids = tokenize_documents(tokenizer, [r[column] for r in train])
            val_ids = tokenize_documents(tokenizer, [r[column] for r in validation])
    block = pre_args.block_size
    if block > tokenizer.model_max_length:
        logger.warning("block_size %d exceeds the tokenizer's model_max_length %d", block, tokenizer.model_max_length)
    train_ds = BlockDataset(train_ids, block, data_args.max_train_samples)
    val_ds = BlockDataset(val_ids, block, data_args.max_eval_samples)
    logger.info("%d train blocks, %d validation blocks of %d tokens", len(train_ds), len(val_ds), block)
    return train_ds, val_ds


def main(argv: list[str] | None = None) -> dict:
    parsed = parse_args((ModelArguments, DataArguments, PretrainArguments), argv)
    model_args, data_args, pre_args, training_args = parsed
    tokenizer = load_tokenizer(model_args, data_args)
    train_ds, val_ds = build_datasets(data_args, pre_args, tokenizer, training_args)
    model = load_model(model_args, tokenizer)
    if pre_args.block_size > getattr(model.config, "max_position_embeddings", pre_args.block_size):
        raise ValueError(
            f"--block_size {pre_args.block_size} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(training_args))
    metrics = finish(
        trainer,
        training_args,
        result,
        {
            "train_blocks": len(train_ds),
            "num_params": sum(p.numel() for p in model.parameters()),
            "world_size": training_args.world_size,
        },
    )
    return metrics


if __name__ == "__main__":
    main()
    shutdown()
