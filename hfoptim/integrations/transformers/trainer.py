"""``HFOptimTrainer``: the HF ``Trainer`` building hfoptim optimizers from the arguments.

    >>> args = HFOptimTrainingArguments("out", optim="ademamix", optim_args="t_alpha=auto,t_beta3=auto")
    >>> HFOptimTrainer(model=model, args=args, train_dataset=data).train()

For an hfoptim ``optim`` it

- builds the optimizer as :mod:`.plan` describes (lr, weight decay and Adam betas from the
  arguments, ``optim_args`` on top, transformers' decay / no-decay groups, per-parameter
  overrides from ``optim_args`` or the ``param_overrides`` keyword, trainable parameters only);
- hands the loss of every optimizer step to loss-driven optimizers (:mod:`.loss`), also under
  DeepSpeed, where the step runs inside ``backward``;
- refuses a DeepSpeed config with its own ``optimizer`` section (DeepSpeed would silently build
  its own optimizer instead);
- logs the optimizer's state bytes (:mod:`.callbacks`);
- checks when it is built and at the first training step that the DeepSpeed ZeRO / FSDP sharding
  the run asks for is engaged, and stops with :class:`~.sharding.ShardingNotEngaged` naming the config and the cause
  otherwise (:mod:`.sharding`).

A transformers built-in ``optim`` behaves exactly as with ``Trainer``.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

from transformers import Trainer
from transformers.training_args import OptimizerNames

from .arguments import DeepSpeedOptimizerConflict, deepspeed_conflict_message
from .callbacks import OptimizerStateCallback
from .loss import LossHandoff, loss_driven
from .names import resolve_optim
from .optim_args import parse_optim_args
from .plan import (
    build_param_groups,
    check_plan,
    declared_layouts,
    optimizer_kwargs,
    overrides_from,
    role_options,
    split_layouts,
    split_optim_args,
    take_role_options,
)
from .sharding import check_accelerator, check_sharding, requested_sharding

logger = logging.getLogger(__name__)


class HFOptimTrainer(Trainer):
    """``Trainer`` for hfoptim optimizers named in ``HFOptimTrainingArguments.optim``.

    Args (besides ``Trainer``'s):
        param_overrides: ``{selector: {option: value}}`` applied after ``optim_args``'
            ``selector:option=value`` entries; ``selector`` is ``"embeddings"`` (parameters of
            ``nn.Embedding`` modules) or a regular expression searched in parameter names, e.g.
            ``{"embeddings": {"state": "fp32", "weight_decay": 0.0}}``.
        log_state_bytes: add :class:`OptimizerStateCallback` (default True).
    """

    def __init__(self, *args, param_overrides: dict | None = None, log_state_bytes: bool = True, **kwargs):
        self.param_overrides = overrides_from(param_overrides)
        self.loss_handoff = LossHandoff()
        super().__init__(*args, **kwargs)
        self._sharding_to_check = requested_sharding(self.args)
        check_accelerator(self._sharding_to_check, self.accelerator)
        choice = resolve_optim(self.args.optim)
        if choice.is_hfoptim and self.param_overrides:
            check_plan(choice.spec, {}, self.param_overrides, f"optim={choice.name!r}, param_overrides")
        self._check_deepspeed(choice)
        if choice.is_hfoptim and (self.optimizer is not None or self.optimizer_cls_and_kwargs is not None):
            given = "optimizers=" if self.optimizer is not None else "optimizer_cls_and_kwargs="
            logger.warning("optim=%r unused: the optimizer given with %s wins, as in transformers", choice.name, given)
        if log_state_bytes:
            self.callback_handler.callbacks.insert(0, OptimizerStateCallback())

    # ------------------------------------------------------------------ checks
    def _check_deepspeed(self, choice) -> None:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        config = getattr(plugin, "deepspeed_config", None) or {}
        if "optimizer" not in config:
            return
        if choice.is_hfoptim:
            raise DeepSpeedOptimizerConflict(deepspeed_conflict_message(choice.name, "accelerate's DeepSpeed plugin"))
        if self.optimizer is not None:
            raise DeepSpeedOptimizerConflict(
                "an optimizer was passed with optimizers=, but the DeepSpeed config has an 'optimizer' section: "
                "DeepSpeed would build its own and silently drop the one passed. Remove one of the two."
            )

    # ------------------------------------------------------------------ optimizer
    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """As ``Trainer.get_optimizer_cls_and_kwargs`` for built-ins (also ``"transformers:<name>"``)."""
        choice = resolve_optim(args.optim)
        if choice.is_hfoptim:
            raise ValueError(
                f"optim={choice.name!r} is an hfoptim optimizer: HFOptimTrainer.create_optimizer builds it "
                f"(it needs the model's parameter groups, not a class and kwargs)"
            )
        if args.optim is not choice.builtin:
            args = copy.copy(args)
            args.optim = OptimizerNames(choice.builtin)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def total_training_steps(self) -> int | None:
        """The number of optimizer steps of the run (for ``auto`` options), when known."""
        if self.state is not None and self.state.max_steps and self.state.max_steps > 0:
            return int(self.state.max_steps)
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return None

    def create_optimizer(self, model=None):
        choice = resolve_optim(self.args.optim)
        if not choice.is_hfoptim or self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        self.optimizer = self._build_hfoptim(choice, self.model if model is None else model)
        return self.optimizer

    def _build_hfoptim(self, choice, model):
        options, overrides = split_optim_args(parse_optim_args(self.args.optim_args))
        options, by_name = take_role_options(choice.spec, options, f"optim={choice.name!r}")
        overrides = overrides + self.param_overrides
        total = self.total_training_steps()
        kwargs = optimizer_kwargs(self.args, choice.spec, options, total)
        overrides, layout_rules = split_layouts(options, overrides, f"optim={choice.name!r}")
        groups = build_param_groups(
            model,
            self.get_decay_parameter_names(model),
            kwargs["weight_decay"],
            overrides,
            total,
            by_role=role_options(model, choice.spec, by_name),
        )
        groups = _split_by_mesh(groups)
        layouts = declared_layouts(model, {n for g in groups for n in g["param_names"]}, layout_rules)
        optimizer = choice.spec(groups, param_layouts=layouts, **kwargs)
        logger.info(
            "hfoptim: %s (%s) with %s; groups: %s",
            choice.name,
            type(optimizer).__name__,
            kwargs,
            [(len(g["params"]), {k: v for k, v in g.items() if k not in ("params", "param_names")}) for g in groups],
        )
        return optimizer

    # ------------------------------------------------------------------ loss hand-off
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._sharding_to_check is not None:  # the first step: model and optimizer are wrapped by now
            requested, self._sharding_to_check = self._sharding_to_check, None
            check_sharding(requested, self.accelerator, model, self.optimizer)
        engines = loss_driven(self.optimizer)
        if not engines:
            return super().training_step(model, inputs, num_items_in_batch)
        accelerator = self.accelerator
        own = "backward" in accelerator.__dict__
        backward = accelerator.backward
        handoff = self.loss_handoff

        def backward_handing_loss(loss, **kwargs):
            handoff.add(loss)
            if accelerator.sync_gradients:  # last micro-batch: the step follows (inside backward under DeepSpeed)
                handoff.hand_to(engines, accelerator)
            return backward(loss, **kwargs)

        accelerator.backward = backward_handing_loss
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if own:
                accelerator.backward = backward
            else:
                del accelerator.backward


def _split_by_mesh(groups: list[dict]) -> list[dict]:
    """One group per device mesh where parameters live on several (as transformers does)."""
    from transformers.trainer_optimizer import has_mixed_dtensor

    if not has_mixed_dtensor(p for g in groups for p in g["params"]):
        return groups
    from torch.distributed.tensor import DTensor

    out = []
    for group in groups:
        by_mesh = defaultdict(lambda: ([], []))
        for p, n in zip(group["params"], group["param_names"]):
            params, names = by_mesh[p.device_mesh if isinstance(p, DTensor) else None]
            params.append(p)
            names.append(n)
        out.extend({**group, "params": ps, "param_names": ns} for ps, ns in by_mesh.values())
    return out
