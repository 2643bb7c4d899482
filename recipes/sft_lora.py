"""Supervised fine-tuning with peft LoRA (default) or all weights (``--full_finetune``), with any
hfoptim optimizer.

Examples are (prompt, response) pairs; the loss is taken on the response tokens only. With no data
arguments it uses the embedded default: documented functions of the Python standard library,
prompt = signature and docstring, response = the function's code. Start from a pretrained model
(``--model_name_or_path``: a hub name, or the output of recipes/pretrain_clm.py):

    python recipes/pretrain_clm.py --output_dir outputs/pretrain --max_steps 300 --learning_rate 3e-3
    python recipes/sft_lora.py --model_name_or_path outputs/pretrain --output_dir outputs/sft \\
        --optim adamw_8bit --learning_rate 1e-3 --max_steps 200 --lora_r 16

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/sft_lora.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B --train_file data/train.jsonl --output_dir outputs/sft ...

Local data: ``.jsonl`` with ``prompt`` and ``response`` fields (see ``--prompt_column`` /
``--response_column``). Writes the adapter (or the full model), tokenizer and checkpoints to
``--output_dir`` with ``train_results.json``, ``eval_results.json`` (validation ``eval_loss`` on
response tokens and ``perplexity``) and ``all_results.json``; ``--merge_lora`` also writes the
merged model to ``<output_dir>/merged``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
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

from hfoptim.app.corpus import function_examples, stdlib_corpus  # noqa: E402

IGNORE = -100


@dataclass
class SFTArguments:
    full_finetune: bool = field(default=False, metadata={"help": "Train all weights instead of LoRA adapters."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names to adapt, or 'all-linear'."}
    )
    merge_lora: bool = field(default=False, metadata={"help": "Also save the merged model to <output_dir>/merged."})
    max_seq_length: int = field(default=256, metadata={"help": "Prompt + response tokens kept per example."})
    prompt_column: str = field(default="prompt", metadata={"help": "Field holding the prompt."})
    response_column: str = field(default="response", metadata={"help": "Field holding the response."})
    prompt_template: str = field(
        default="### Instruction:\n{prompt}\n\n### Response:\n",
        metadata={"help": "How the prompt is shown to the model; the response follows it."},
    )


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized pairs: ``input_ids`` = prompt + response + EOS, ``labels`` = IGNORE on the prompt."""

    def __init__(self, records, tokenizer, sft: SFTArguments, limit: int | None = None):
        self.items = []
        skipped = 0
        for record in records:
            prompt = sft.prompt_template.format(prompt=record[sft.prompt_column])
            p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            r_ids = tokenizer(record[sft.response_column], add_special_tokens=False)["input_ids"]
            r_ids = r_ids + [tokenizer.eos_token_id]
            room = sft.max_seq_length - len(p_ids)
            if room < 8:  # the prompt alone fills the window: nothing to learn from
                skipped += 1
                continue
            r_ids = r_ids[:room]
            self.items.append((p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids))
            if limit is not None and len(self.items) >= limit:
                break
        if not self.items:
            raise ValueError(f"no example fits --max_seq_length {sft.max_seq_length} ({skipped} skipped)")
        if skipped:
            logger.info("skipped %d examples whose prompt fills --max_seq_length", skipped)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}


class PadCollator:
    """Right-pads a batch: ``pad_token_id`` for inputs, IGNORE for labels, 0 in the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_datasets(data_args: DataArguments, sft: SFTArguments, tokenizer, training_args):
    records = load_records(data_args, training_args)
    if records is None:
        corpus = stdlib_corpus(data_args.embedded_max_bytes)
        train = function_examples(corpus, "train")
        validation = function_examples(corpus, "validation")
        logger.info("embedded SFT pairs: %d train / %d validation functions", len(train), len(validation))
    else:
        train, validation = records
    for name, rows in (("train", train), ("validation", validation)):
        if rows and (sft.prompt_column not in rows[0] or sft.response_column not in rows[0]):
            raise ValueError(
                f"{name} records need fields {sft.prompt_column!r} and {sft.response_column!r} "
                f"(see --prompt_column/--response_column); found {sorted(rows[0])}"
            )
    with training_args.main_process_first(desc="tokenizing"):
        train_ds = SFTDataset(train, tokenizer, sft, data_args.max_train_samples)
        val_ds = SFTDataset(validation, tokenizer, sft, data_args.max_eval_samples)
    return train_ds, val_ds


def add_lora(model, sft: SFTArguments):
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "LoRA (the default; --full_finetune trains without it) needs the package 'peft', which the "
            "library does not install; install the recipes' extra: pip install 'hfoptim[recipes]'"
        ) from error

    targets = sft.lora_target_modules
    config = LoraConfig(
        r=sft.lora_r,
        lora_alpha=sft.lora_alpha,
        lora_dropout=sft.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, sft, training_args = parse_args((ModelArguments, DataArguments, SFTArguments), argv)
    tokenizer = load_tokenizer(model_args, data_args)
    train_ds, val_ds = build_datasets(data_args, sft, tokenizer, training_args)
    if model_args.model_name_or_path is None:
        logger.warning(
            "no --model_name_or_path: fine-tuning a freshly initialised %s; pass a pretrained model "
            "(e.g. the output of recipes/pretrain_clm.py) for a meaningful result",
            model_args.config_name,
        )
    model = load_model(model_args, tokenizer)
    if not sft.full_finetune:
        model = add_lora(model, sft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(training_args))
    metrics = finish(
        trainer,
        training_args,
        result,
        {
            "mode": "full" if sft.full_finetune else "lora",
            "trainable_params": trainable,
            "train_examples": len(train_ds),
            "world_size": training_args.world_size,
        },
    )
    if sft.merge_lora and not sft.full_finetune and training_args.should_save:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(os.path.join(training_args.output_dir, "merged"))
        tokenizer.save_pretrained(os.path.join(training_args.output_dir, "merged"))
    return metrics


if __name__ == "__main__":
    main()
    shutdown()
