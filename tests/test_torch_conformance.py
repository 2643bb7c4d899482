"""torch.optim conformance: PyTorch's generic optimizer checks, run over hfoptim's optimizers.

Every hfoptim optimizer class (and Lookahead over AdamW) is registered as an ``OptimizerInfo``
of ``torch.testing._internal.common_optimizers`` and driven through the ``@optims`` /
``instantiate_device_type_tests`` machinery, by the generic tests of ``TestOptimRenewed`` in
PyTorch's test/test_optim.py (which is not part of the torch wheel). The tests below are
re-implementations, written here, of the checks those tests make that apply to a CPU optimizer
without complex, sparse, fused, capturable or differentiable support. The inputs of each
optimizer are non-default: another learning rate, ``maximize``, weight decay, every compressed
storage form the rule accepts, ``skip_nonfinite``.

Skipped, each with its reason (:data:`NOT_APPLICABLE`); each refused feature is checked to fail
loudly instead (``test_refused_features_fail_loudly``).
"""

from __future__ import annotations

import io
from copy import deepcopy

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    optims,
)
from torch.testing._internal.common_utils import TestCase, parametrize

import hfoptim
from hfoptim.core.hparams import HyperparameterError

#: 325 optimizer x test pairs: about 1 minute on a quiet 2-core machine, 3-4 under load
pytestmark = pytest.mark.slow

#: generic tests of TestOptimRenewed that are not run, and why
NOT_APPLICABLE = {
    "test_complex / test_complex_2d": "hfoptim refuses complex parameters (TypeError at construction, checked below)",
    "test_rosenbrock_sparse": "hfoptim refuses sparse gradients (RuntimeError at step, checked below)",
    "test_fused_* / test_fused_cpu_matches_cuda": "no fused=True implementation (the option is refused)",
    "test_*capturable*": "no CUDA-graph capturable implementation (the option is refused)",
    "test_differentiable_*": "steps run under no_grad; differentiable=True is refused",
    "test_forloop_goes_right_direction_multigpu / test_mixed_device_dtype": "need several CUDA devices",
    "test_state_dict_with_cuda_params / test_cpu_load_state_dict": "need CUDA",
    "test_peak_memory_foreach / test_defaults_changed_to_foreach": "CUDA memory and default-kernel checks",
    "test_can_load_older_state_dict (missing group keys)": "hfoptim refuses a saved group lacking a "
    "hyperparameter at load, by design (test_group_lacking_a_key_fails_at_load_naming_it); the "
    "non-tensor step part is run below",
    "test_optim_infos_do_not_specify_global_cliquey_kwargs": "checks torch's own OptimizerInfo table",
}


def _accepted_forms(cls) -> list[str]:
    forms = []
    for form in ("8bit", "bf16", "factored", "smmf", "shared"):
        try:
            cls([Parameter(torch.randn(4, 3))], state=form)
        except HyperparameterError:
            continue
        forms.append(form)
    return forms


def _inputs_func(cls):
    rule = cls.rule_class
    default_lr = rule.hyperparams["lr"].default

    def inputs(device, dtype=None):
        out = [
            OptimizerInput(params=None, kwargs={}, desc="default"),
            OptimizerInput(params=None, kwargs={"lr": default_lr * 2}, desc="non-default lr"),
            OptimizerInput(params=None, kwargs={"maximize": True}, desc="maximize"),
            OptimizerInput(params=None, kwargs={"skip_nonfinite": True}, desc="skip_nonfinite"),
        ]
        if "weight_decay" in rule.hyperparams:
            out.append(OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"))
        for form in _accepted_forms(cls):
            out.append(OptimizerInput(params=None, kwargs={"state": form, "state_min_numel": 0}, desc=form))
        return out

    return inputs


def _error_inputs(device, dtype):
    return [
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"lr": -1.0}, desc="negative lr"),
            error_type=ValueError,
            error_regex="invalid lr=-1.0",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"weight_decay_mode": "nope"}, desc="unknown decay form"),
            error_type=ValueError,
            error_regex="weight_decay_mode",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"state": "3bit"}, desc="unknown storage form"),
            error_type=ValueError,
            error_regex="unknown state form",
        ),
    ]


class LookaheadAdamW(hfoptim.Lookahead):
    """Lookahead(k=3) over hfoptim.AdamW, constructed from parameters like any optimizer."""

    rule_class = hfoptim.AdamW.rule_class

    def __init__(self, params, k: int = 3, alpha: float = 0.5, **kwargs):
        super().__init__(hfoptim.AdamW(params, **kwargs), k=k, alpha=alpha)


def _info(cls) -> OptimizerInfo:
    return OptimizerInfo(
        cls,
        optim_inputs_func=_inputs_func(cls),
        scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10)], [ReduceLROnPlateau]),
        supported_impls=("foreach",),
        not_og_supported_flags=(),
        supports_complex=False,
        supports_sparse=False,
        step_requires_closure=cls.rule_class.needs_loss,
        optim_error_inputs_func=_error_inputs,
    )


HFOPTIM_DB = [_info(cls) for cls in hfoptim.CLASSES.values()] + [_info(LookaheadAdamW)]


def _with_foreach(optim_info, device):
    """Every input twice: ``foreach=False`` (the per-tensor path) and ``foreach=True``."""
    out = []
    for optim_input in optim_info.optim_inputs_func(device=device):
        for foreach in (False, True):
            kwargs = {**deepcopy(optim_input.kwargs), "foreach": foreach}
            out.append(OptimizerInput(params=None, kwargs=kwargs, desc=f"{optim_input.desc}, foreach={foreach}"))
    return out


def _engine(optimizer):
    return getattr(optimizer, "optimizer", optimizer) if isinstance(optimizer, hfoptim.Lookahead) else optimizer


def _step(optimizer, optim_info, closure):
    """One step as the generic tests take it: with the closure where the optimizer needs it."""
    if optim_info.step_requires_closure:
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def _problem(device, dtype, contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn((10, 5), generator=gen, dtype=dtype).to(device))
        bias = Parameter(torch.randn(10, generator=gen, dtype=dtype).to(device))
    else:
        weight = Parameter(torch.randn((10, 5, 2), generator=gen, dtype=dtype).to(device)[..., 0])
        bias = Parameter(torch.randn((10, 2), generator=gen, dtype=dtype).to(device)[..., 0])
    inpt = torch.randn(5, generator=gen, dtype=dtype).to(device)
    return weight, bias, inpt


def _closure(optimizer, weight, bias, inpt):
    def closure():
        optimizer.zero_grad()
        loss = (weight.mv(inpt) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


class TestHFOptimConformance(TestCase):
    """PyTorch's generic optimizer checks (see the module docstring)."""

    @optims(HFOPTIM_DB)
    def test_errors(self, device, dtype, optim_info):
        for error_input in optim_info.optim_error_inputs_func(device=device, dtype=dtype):
            kwargs = error_input.optimizer_error_input.kwargs
            params = [Parameter(torch.randn(4, 3, device=device))]
            self.assertEqual(error_input.error_on, OptimizerErrorEnum.CONSTRUCTION_ERROR)
            with self.assertRaisesRegex(error_input.error_type, error_input.error_regex):
                optim_info.optim_cls(params, **kwargs)

    @parametrize("contiguous", [True, False])
    @parametrize("with_lrsched", [True, False])
    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info, contiguous, with_lrsched):
        schedulers_constructors = optim_info.scheduler_inputs if with_lrsched else [None]
        for schedulers_constructor in schedulers_constructors:
            for optim_input in optim_info.optim_inputs_func(device=device):
                kwargs = {**optim_input.kwargs, "foreach": False}
                weight, bias, inpt = _problem(device, dtype, contiguous)
                optimizer = optim_info.optim_cls([weight, bias], **kwargs)
                schedulers = [s(optimizer) for s in (schedulers_constructor or [])]
                closure = _closure(optimizer, weight, bias, inpt)
                initial = closure().item()
                for _ in range(20):
                    loss = _step(optimizer, optim_info, closure)
                    for scheduler in schedulers:
                        scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
                if kwargs.get("maximize", False):
                    self.assertGreater(closure().item(), initial, msg=optim_input.desc)
                else:
                    self.assertLess(closure().item(), initial, msg=optim_input.desc)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_param_group_with_lrscheduler_goes_right_direction(self, device, dtype, optim_info):
        for schedulers_c in optim_info.scheduler_inputs:
            weight, bias, inpt = _problem(device, dtype)
            optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
            schedulers = [s(optimizer) for s in schedulers_c]
            closure = _closure(optimizer, weight, bias, inpt)
            initial = closure().item()
            for _ in range(20):
                loss = optimizer.step(closure)
                for scheduler in schedulers:
                    scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            self.assertLess(closure().item(), initial)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_tensor_lr(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            weight, bias, inpt = _problem(device, dtype)
            weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
            kwargs = {**optim_input.kwargs, "lr": 1e-3}
            optimizer_r = optim_info.optim_cls([weight, bias], **kwargs)
            optimizer = optim_info.optim_cls([weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3)})
            for _ in range(5):
                _step(optimizer_r, optim_info, _closure(optimizer_r, weight, bias, inpt))
                _step(optimizer, optim_info, _closure(optimizer, weight_c, bias_c, inpt))
                self.assertEqual(weight, weight_c)
                self.assertEqual(bias, bias_c)

    @optims(HFOPTIM_DB, dtypes=[torch.float32, torch.float64])
    def test_foreach_matches_forloop(self, device, dtype, optim_info):
        # TestOptimRenewed runs it on CUDA only (torch's CPU foreach is its for-loop); hfoptim's
        # two paths are different code on CPU too
        for optim_input in optim_info.optim_inputs_func(device=device):
            runs = []
            for foreach in (False, True):
                weight, bias, inpt = _problem(device, dtype, seed=3)
                optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs, foreach=foreach)
                for _ in range(5):
                    _step(optimizer, optim_info, _closure(optimizer, weight, bias, inpt))
                runs.append((weight, bias, optimizer))
            (w0, b0, o0), (w1, b1, o1) = runs
            tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
            torch.testing.assert_close(w1, w0, **tol, msg=optim_input.desc)
            torch.testing.assert_close(b1, b0, **tol, msg=optim_input.desc)
            for p0, p1 in ((w0, w1), (b0, b1)):
                s0, s1 = o0.state[p0], o1.state[p1]
                self.assertEqual(set(s0), set(s1))
                for key in s0:
                    if s0[key].is_floating_point():
                        torch.testing.assert_close(s1[key], s0[key], **tol, msg=f"{optim_input.desc}: {key}")
                    else:  # 8-bit codes, sign bits: at most a rounding boundary apart
                        self.assertLessEqual((s1[key].int() - s0[key].int()).abs().max().item(), 1)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
            old = [p.detach().clone() for p in params]
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            optimizer.step(lambda: torch.tensor(1.0)) if optim_info.step_requires_closure else optimizer.step()
            self.assertEqual(params, old)
            self.assertEqual(len(optimizer.state), 0)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            kwargs = optim_input.kwargs
            if kwargs.get("weight_decay", 0) or "weight_decay" in optim_info.optim_cls.rule_class.hyperparams:
                kwargs = {**kwargs, "weight_decay": 0.0}  # decay moves parameters without a gradient
            param = Parameter(torch.randn(5, 1, device=device, dtype=dtype))
            old = param.detach().clone()
            optimizer = optim_info.optim_cls([param], **kwargs)
            param.grad = torch.zeros_like(param)
            optimizer.step(lambda: torch.tensor(1.0)) if optim_info.step_requires_closure else optimizer.step()
            self.assertEqual(param, old, msg=optim_input.desc)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_optimizer_can_be_printed(self, device, dtype, optim_info):
        params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
        text = repr(optim_info.optim_cls(params))
        self.assertIn("Parameter Group 0", text)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_state_dict_deterministic(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            weight, bias, inpt = _problem(device, dtype)
            optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
            closure = _closure(optimizer, weight, bias, inpt)
            for _ in range(10):
                _step(optimizer, optim_info, closure)
            weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
            optimizer_c = optim_info.optim_cls([weight_c, bias_c], **optim_input.kwargs)
            closure_c = _closure(optimizer_c, weight_c, bias_c, inpt)
            state_dict = deepcopy(optimizer.state_dict())
            state_dict_c = deepcopy(optimizer.state_dict())
            optimizer_c.load_state_dict(state_dict_c)
            for _ in range(10):
                _step(optimizer, optim_info, closure)
                _step(optimizer_c, optim_info, closure_c)
                self.assertEqual(weight, weight_c)
                self.assertEqual(bias, bias_c)
            self.assertEqual(state_dict, state_dict_c)  # loading did not change the dict
            self.assertEqual(optimizer.state_dict(), optimizer_c.state_dict())

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_load_nontensor_step(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            weight, bias, inpt = _problem(device, dtype)
            optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
            closure = _closure(optimizer, weight, bias, inpt)
            for _ in range(3):
                _step(optimizer, optim_info, closure)
            state_dict = optimizer.state_dict()
            for state in state_dict["state"].values():
                if "step" in state and torch.is_tensor(state["step"]):
                    state["step"] = state["step"].item()
            optimizer.load_state_dict(state_dict)
            _step(optimizer, optim_info, closure)
            steps = [s["step"] for s in _engine(optimizer).state.values()]
            self.assertTrue(all(torch.is_tensor(s) and s.item() == 4 for s in steps), msg=str(steps))

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_save_load_equality_with_weights_only(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            weight, bias, inpt = _problem(device, dtype)
            optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
            closure = _closure(optimizer, weight, bias, inpt)
            for _ in range(3):
                _step(optimizer, optim_info, closure)
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=True)
            self.assertEqual(loaded, optimizer.state_dict())

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_deepcopy_copies_all_public_attrs(self, device, dtype, optim_info):
        weight, bias, inpt = _problem(device, dtype)
        optimizer = optim_info.optim_cls([weight, bias])
        _step(optimizer, optim_info, _closure(optimizer, weight, bias, inpt))

        def public(obj):
            return {k for k in obj.__dict__ if not k.startswith("_")}

        self.assertEqual(public(optimizer), public(deepcopy(optimizer)))

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_non_empty_state(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
            model.to(device=device, dtype=dtype)
            inpt = torch.randn(1, 4, 16, 16, device=device, dtype=dtype)
            optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)

            def closure(optimizer=optimizer, model=model, inpt=inpt):
                optimizer.zero_grad()
                loss = model(inpt).sum()
                loss.backward()
                return loss

            _step(optimizer, optim_info, closure)
            for p in model.parameters():
                self.assertTrue(len(_engine(optimizer).state[p]) > 0, msg=optim_input.desc)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_grads_are_never_inplaced_into(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype)) for _ in range(2)]
            optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                grads = [p.grad.clone() for p in params]
                versions = [p.grad._version for p in params]
                optimizer.step(lambda: torch.tensor(1.0)) if optim_info.step_requires_closure else optimizer.step()
                self.assertEqual([p.grad for p in params], grads)
                self.assertEqual([p.grad._version for p in params], versions)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_param_groups_weight_decay(self, device, dtype, optim_info):
        if "weight_decay" not in optim_info.optim_cls.rule_class.hyperparams:
            return
        for optim_input in _with_foreach(optim_info, device):
            weight, bias, inpt = _problem(device, dtype)
            kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "weight_decay"}
            groups = [{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}]
            optimizer = optim_info.optim_cls(groups, **kwargs)
            closure = _closure(optimizer, weight, bias, inpt)
            initial = closure().item()
            for _ in range(20):
                _step(optimizer, optim_info, closure)
            if kwargs.get("maximize", False):
                self.assertGreater(closure().item(), initial)
            else:
                self.assertLess(closure().item(), initial)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_param_groups_lr(self, device, dtype, optim_info):
        for optim_input in _with_foreach(optim_info, device):
            weight, bias, inpt = _problem(device, dtype)
            kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "lr"}
            groups = [{"params": [weight]}, {"params": [bias], "lr": 0.01}]
            optimizer = optim_info.optim_cls(groups, **kwargs)
            closure = _closure(optimizer, weight, bias, inpt)
            initial = closure().item()
            for _ in range(20):
                _step(optimizer, optim_info, closure)
            if kwargs.get("maximize", False):
                self.assertGreater(closure().item(), initial)
            else:
                self.assertLess(closure().item(), initial)

    # ------------------------------------------------------------------ hooks
    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_step_all_hooks(self, device, dtype, optim_info):
        """Global and per-optimizer pre/post hooks fire once per step, in torch's order."""
        weight, bias, inpt = _problem(device, dtype)
        optimizer = optim_info.optim_cls([weight, bias])
        data = []

        def record(tag):
            return lambda opt, args, kwargs: data.append((tag, opt is optimizer))

        handles = [
            register_optimizer_step_pre_hook(record("global_pre")),
            optimizer.register_step_pre_hook(record("pre")),
            optimizer.register_step_post_hook(record("post")),
            register_optimizer_step_post_hook(record("global_post")),
        ]
        try:
            closure = _closure(optimizer, weight, bias, inpt)
            _step(optimizer, optim_info, closure)
            _step(optimizer, optim_info, closure)
        finally:
            for handle in handles:
                handle.remove()
        once = [("global_pre", True), ("pre", True), ("post", True), ("global_post", True)]
        self.assertEqual(data, once * 2)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_state_dict_hooks(self, device, dtype, optim_info):
        weight, bias, inpt = _problem(device, dtype)
        optimizer = optim_info.optim_cls([weight, bias])
        _step(optimizer, optim_info, _closure(optimizer, weight, bias, inpt))
        calls = []

        def pre(opt):
            calls.append("pre")
            opt.state["marker"] = 1

        def post(opt, state_dict):
            calls.append("post")
            opt.state.pop("marker")
            state_dict["extra"] = state_dict["state"].pop("marker") + 6
            return state_dict

        optimizer.register_state_dict_pre_hook(pre)
        optimizer.register_state_dict_post_hook(post)
        state_dict = optimizer.state_dict()
        self.assertEqual(calls, ["pre", "post"])
        self.assertEqual(state_dict["extra"], 7)
        self.assertNotIn("marker", optimizer.state)

        def load_pre(opt, sd):
            calls.append("load_pre")
            sd = dict(sd)
            sd.pop("extra")
            return sd

        optimizer.register_load_state_dict_pre_hook(load_pre)
        optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load_post"))
        optimizer.load_state_dict(state_dict)
        self.assertEqual(calls, ["pre", "post", "load_pre", "load_post"])

    # ------------------------------------------------------------------ torch >= 2.6 API
    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_named_parameters_and_named_state_dicts(self, device, dtype, optim_info):
        model = torch.nn.Linear(5, 10).to(device=device, dtype=dtype)
        optimizer = optim_info.optim_cls(model.named_parameters())
        # every group's names in order (Muon splits a group into its matrices and the rest)
        self.assertEqual([n for g in optimizer.param_groups for n in g["param_names"]], ["weight", "bias"])
        inpt = torch.randn(5, device=device, dtype=dtype)
        closure = _closure(optimizer, model.weight, model.bias, inpt)
        _step(optimizer, optim_info, closure)
        state_dict = optimizer.state_dict()
        self.assertEqual([n for g in state_dict["param_groups"] for n in g["param_names"]], ["weight", "bias"])
        twin = torch.nn.Linear(5, 10).to(device=device, dtype=dtype)
        twin.load_state_dict(model.state_dict())  # the parameters after the first step
        optimizer_c = optim_info.optim_cls(twin.named_parameters())
        optimizer_c.load_state_dict(state_dict)
        _step(optimizer, optim_info, closure)
        _step(optimizer_c, optim_info, _closure(optimizer_c, twin.weight, twin.bias, inpt))
        self.assertEqual(model.weight, twin.weight)

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_foreach_in_param_group(self, device, dtype, optim_info):
        """A group's own ``foreach`` chooses its path and gives the optimizer-wide result."""
        runs = []
        for groups_foreach in ((None, None), (False, True)):
            weight, bias, inpt = _problem(device, dtype, seed=4)
            groups = [
                {"params": [weight], "foreach": groups_foreach[0]},
                {"params": [bias], "foreach": groups_foreach[1]},
            ]
            optimizer = optim_info.optim_cls(groups, foreach=False)
            for _ in range(3):
                _step(optimizer, optim_info, _closure(optimizer, weight, bias, inpt))
            runs.append((weight, bias))
        optimizer_c = optim_info.optim_cls([{"params": [weight]}, {"params": [bias]}], foreach=True)
        optimizer_c.load_state_dict(optimizer.state_dict())  # the saved groups' foreach: not this run's
        self.assertEqual([g.get("foreach") for g in optimizer_c.param_groups], [None, None])
        torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)
        with self.assertRaisesRegex(ValueError, "foreach='yes'"):
            optim_info.optim_cls([{"params": [Parameter(torch.randn(2))], "foreach": "yes"}])

    @optims(HFOPTIM_DB, dtypes=[torch.float32])
    def test_refused_features_fail_loudly(self, device, dtype, optim_info):
        cls = optim_info.optim_cls
        with self.assertRaisesRegex(TypeError, "complex"):
            cls([Parameter(torch.randn(3, dtype=torch.complex64, device=device))])
        for flag in ("fused", "capturable", "differentiable"):
            with self.assertRaisesRegex(ValueError, flag):
                cls([Parameter(torch.randn(3, device=device))], **{flag: True})
        param = Parameter(torch.randn(3, device=device))
        optimizer = cls([param])
        param.grad = torch.randn(3, device=device).to_sparse()
        with self.assertRaisesRegex(RuntimeError, "sparse"):
            optimizer.step(lambda: torch.tensor(1.0)) if optim_info.step_requires_closure else optimizer.step()


instantiate_device_type_tests(TestHFOptimConformance, globals(), only_for="cpu")
