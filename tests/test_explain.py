"""`bn-diff explain` arithmetic: the forum numbers of DESIGN.md, and a cross-check against `run`
and against PyTorch for random layers of every BatchNorm kind, in both modes."""

from __future__ import annotations

import copy
import math
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bn_diff.errors import UsageError
from bn_diff.explain_results import Explanation
from bn_diff.pipeline import run
from bn_diff.pipeline_explain import choose_element, explain, parse_index

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

GAMMA = (0.8352, 0.2056)


def forum_situation() -> tuple[nn.Module, torch.Tensor]:
    """A BatchNorm2d(2) in train mode, weight [0.8352, 0.2056], bias 0, whose input has
    x[0,0,0,0] = -0.0403 and whose output there is -1.6799: the forum user's numbers.

    Channel 0 is built as mu + sigma·z with z of mean 0 and biased variance 1 exactly (in float64),
    and z[0] chosen so that 0.8352·(x0 − mu)/sqrt(sigma² + eps) = −1.6799.
    """
    net = nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(2)))
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor(GAMMA))
        net.bn.bias.zero_()
    x0, y0, sigma, eps = -0.0403, -1.6799, 0.02, 1e-5
    g = torch.Generator().manual_seed(7)
    shape = (4, 2, 4, 4)
    m = shape[0] * shape[2] * shape[3]
    t = y0 / GAMMA[0] * math.sqrt(sigma**2 + eps) / sigma  # the standardized value of x0
    rest = torch.randn(m - 1, generator=g, dtype=torch.float64)
    rest = rest - rest.mean() - t / (m - 1)  # sum(rest) = -t: z has mean 0
    dev = rest - rest.mean()
    want = m - t * t - (m - 1) * float(rest.mean()) ** 2  # sum(z²) = m: biased variance 1
    rest = rest.mean() + dev * math.sqrt(want / float((dev * dev).sum()))
    z = torch.cat([torch.tensor([t], dtype=torch.float64), rest])
    mu = x0 - sigma * t
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, 0] = (mu + sigma * z).reshape(shape[0], shape[2], shape[3])
    return net, x.float()


def test_forum_numbers_of_design_md() -> None:
    net, x = forum_situation()
    exp = explain(net, x, layer="bn", index=(0, 0, 0, 0))
    assert exp.layer.mode == "train" and exp.layer.stats == "batch"
    assert exp.element.x == pytest.approx(-0.0403, abs=1e-7)
    assert exp.element.y_pytorch == pytest.approx(-1.6799, abs=2e-4)
    assert exp.element.y_by_hand == pytest.approx(exp.element.y_pytorch, abs=exp.element.allowed)
    assert bool(exp)
    alt = {a.id: a for a in exp.alternatives}
    # the forum user's own inference code: 0.8352 · -0.0403
    assert alt["no_normalization"].value == pytest.approx(-0.0337, abs=1e-4)
    assert alt["no_normalization"].value == pytest.approx(0.8352 * -0.0403, rel=1e-6)
    assert not alt["no_normalization"].matches_pytorch
    # fresh running statistics 0/1: eval mode would give (almost) the same as γx+β
    assert alt["eval_running"].value == pytest.approx(-0.0403 * 0.8352 / math.sqrt(1 + 1e-5))
    assert "no_normalization" in alt["eval_running"].tied_with
    # the channel's statistics are those of x[:, 0]
    c0 = x[:, 0].double()
    assert exp.channel.batch_mean == pytest.approx(float(c0.mean()), abs=1e-12)
    assert exp.channel.batch_var == pytest.approx(float(c0.var(unbiased=False)), rel=1e-9)
    assert exp.element.x_hat == pytest.approx(-1.6799 / 0.8352, abs=3e-4)


def test_model_left_as_found() -> None:
    net, x = forum_situation()
    before = copy.deepcopy(net.state_dict())
    explain(net, x, layer="bn", channel=1)
    assert net.training and net.bn.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.bn._forward_hooks and not net.bn._forward_pre_hooks


# --- random layers of every kind, cross-checked ---------------------------------------------
KINDS = {
    "1d_NC": (nn.BatchNorm1d, (6, 5), {}),
    "1d_NCL": (nn.BatchNorm1d, (3, 4, 7), {}),
    "2d": (nn.BatchNorm2d, (2, 3, 4, 5), {}),
    "3d": (nn.BatchNorm3d, (2, 3, 2, 3, 4), {}),
    "2d_affine_false": (nn.BatchNorm2d, (2, 3, 4, 4), {"affine": False}),
    "2d_no_running": (nn.BatchNorm2d, (2, 3, 4, 4), {"track_running_stats": False}),
    "1d_momentum_none": (nn.BatchNorm1d, (5, 4, 3), {"momentum": None}),
    "2d_eps_1e-3": (nn.BatchNorm2d, (2, 3, 3, 3), {"eps": 1e-3}),
}


def random_layer(kind: str, train: bool, seed: int) -> tuple[nn.Module, torch.Tensor]:
    cls, shape, kw = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    bn = cls(shape[1], **kw)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.randn(shape[1], generator=g))
            bn.bias.copy_(torch.randn(shape[1], generator=g))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(shape[1], generator=g))
            bn.running_var.copy_(torch.rand(shape[1], generator=g) + 0.2)
            bn.num_batches_tracked.fill_(int(torch.randint(0, 5, (), generator=g)))
    net = nn.Sequential(OrderedDict(norm=bn))
    net.train(train)
    x = torch.randn(shape, generator=g) * 2 + torch.randn((), generator=g)
    return net, x


def _f64_bn(x: float, mean: float, var: float, g: float, b: float, eps: float) -> float:
    return g * (x - mean) / math.sqrt(var + eps) + b


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), pick=st.integers(0, 10_000))
def test_explain_agrees_with_run_and_pytorch(kind: str, train: bool, seed: int, pick: int) -> None:
    net, x = random_layer(kind, train, seed)
    idx = tuple(pick % s for s in x.shape)
    c = idx[1]
    ref = copy.deepcopy(net)
    with torch.no_grad():
        y = ref(x)
    exp = explain(net, x, layer="norm", index=idx)
    report = run(net, x)
    ch = report.layers[0].channels[c]

    # the channel's numbers are run's
    assert (exp.channel.batch_mean, exp.channel.batch_var) == (ch.batch_mean, ch.batch_var)
    assert (exp.channel.running_mean, exp.channel.running_var) == (ch.running_mean, ch.running_var)
    m = exp.layer.m
    assert m == x.numel() // x.shape[1]
    xc = x.double().transpose(0, 1)[c].reshape(-1)
    assert exp.channel.batch_var_unbiased == pytest.approx(float(xc.var(unbiased=True)), rel=1e-9)

    # the element, and PyTorch's value for it
    assert exp.element.x == float(x[idx]) and exp.element.y_pytorch == float(y[idx])
    bn = net.norm
    g = 1.0 if bn.weight is None else float(bn.weight.detach()[c])
    b = 0.0 if bn.bias is None else float(bn.bias.detach()[c])
    uses_batch = train or not bn.track_running_stats
    assert exp.layer.stats == ("batch" if uses_batch else "running")
    mean, var = (ch.batch_mean, ch.batch_var) if uses_batch else (ch.running_mean, ch.running_var)
    assert mean is not None and var is not None
    assert exp.element.y_by_hand == pytest.approx(
        _f64_bn(exp.element.x, mean, var, g, b, bn.eps), rel=1e-12, abs=1e-12
    )
    assert exp and abs(exp.element.difference) <= exp.element.allowed
    assert exp.channel.std_used == pytest.approx(math.sqrt(var + bn.eps), rel=1e-15)

    # each misreading is what PyTorch computes in that configuration
    alt = {a.id: a for a in exp.alternatives}
    xe = x.double()
    w = None if bn.weight is None else bn.weight.detach().double()
    bb = None if bn.bias is None else bn.bias.detach().double()
    if bn.track_running_stats:
        rm, rv = bn.running_mean.double(), bn.running_var.double()
        ev = F.batch_norm(xe, rm.clone(), rv.clone(), w, bb, False, 0.1, bn.eps)[idx]
        key = "eval_running" if uses_batch else None
        if key:
            assert alt[key].value == pytest.approx(float(ev), rel=1e-9, abs=1e-12)
        else:  # eval mode: the other mode is train
            tr = F.batch_norm(xe, None, None, w, bb, True, 0.1, bn.eps)[idx]
            assert alt["train_batch"].value == pytest.approx(float(tr), rel=1e-9, abs=1e-12)
    else:
        assert alt["eval_same"].matches_pytorch
    assert alt["no_normalization"].value == pytest.approx(g * exp.element.x + b)
    zeros = torch.zeros(x.shape[1], dtype=torch.float64)
    untrained = F.batch_norm(xe, zeros, zeros + 1, w, bb, False, 0.1, bn.eps)[idx]
    assert alt["eval_untrained"].value == pytest.approx(float(untrained), rel=1e-9, abs=1e-12)
    assert alt["unbiased_variance"].value == pytest.approx(
        _f64_bn(exp.element.x, ch.batch_mean, float(xc.var(unbiased=True)), g, b, bn.eps), rel=1e-9
    )
    eps_alt = [a for a in exp.alternatives if a.id.startswith("eps_")]
    assert len(eps_alt) == 1
    other_eps = 1e-5 if bn.eps == 1e-3 else 1e-3
    assert eps_alt[0].value == pytest.approx(
        _f64_bn(exp.element.x, mean, var, g, b, other_eps), rel=1e-9, abs=1e-12
    )

    # side effects: the running statistics PyTorch wrote, and the recompute of them
    se = exp.side_effects
    if train and bn.track_running_stats:
        changes = {ch_.name: ch_ for ch_ in se.changes}
        rmean, rvar = changes[f"running_mean[{c}]"], changes[f"running_var[{c}]"]
        assert rmean.before == float(bn.running_mean[c])  # the model is left as found
        assert rmean.after == float(ref.norm.running_mean[c])
        assert rvar.after == float(ref.norm.running_var[c])
        assert rmean.expected == pytest.approx(rmean.after, rel=1e-5, abs=1e-6)
        assert rvar.expected == pytest.approx(rvar.after, rel=1e-5, abs=1e-6)
        nbt = changes["num_batches_tracked"]
        assert (nbt.before, nbt.after) == (float(bn.num_batches_tracked), nbt.before + 1)
        k = se.momentum_used
        assert k == (1.0 / nbt.after if bn.momentum is None else bn.momentum)
        ra, va = ref.norm.running_mean.double(), ref.norm.running_var.double()
        ev_after = F.batch_norm(xe, ra, va, w, bb, False, 0.1, bn.eps)[idx]
        after_value = alt["eval_running_after"].value
        assert after_value == pytest.approx(float(ev_after), rel=1e-9, abs=1e-12)
    else:
        assert not se.changes and not se.updates_running_stats
    # JSON is strict JSON with the schema tag
    js = exp.to_json()
    assert js["schema"] == "bn-diff/explain/v1"
    assert js["element"]["index"] == list(idx)


def test_frozen_weights_in_train_mode_say_so() -> None:
    net, x = forum_situation()
    net.bn.weight.requires_grad_(False)
    net.bn.bias.requires_grad_(False)
    exp = explain(net, x, layer="bn")
    assert exp.layer.weight_frozen and exp.side_effects.updates_running_stats
    said = "requires_grad=False, yet the running statistics moved"
    assert any(said in n for n in exp.side_effects.notes)


def test_eval_mode_changes_nothing() -> None:
    net, x = forum_situation()
    net.eval()
    exp = explain(net, x, layer="bn")
    assert exp.layer.stats == "running" and not exp.side_effects.changes
    ids = [a.id for a in exp.alternatives]
    assert "train_batch" in ids and "eval_running" not in ids
    # running statistics 0/1: eval output equals the "untrained" reading
    assert next(a for a in exp.alternatives if a.id == "eval_untrained").matches_pytorch


def test_shared_layer_second_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.bn(x) * 2 + 1)

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    first = explain(Twice(), x, layer="bn")
    second = explain(Twice(), x, layer="bn#2")
    assert second.layer.name == "bn#2"
    assert second.element.x == pytest.approx(first.element.y_pytorch * 2 + 1, rel=1e-6)


def test_choose_element_and_parse_index() -> None:
    assert choose_element((4, 3, 5, 5), None, None) == (0, 0, 0, 0)
    assert choose_element((4, 3, 5, 5), 2, None) == (0, 2, 0, 0)
    assert choose_element((4, 3), 1, None) == (0, 1)
    assert choose_element((4, 3, 5), 1, (3, 1, 4)) == (3, 1, 4)
    assert parse_index("(0, 1, 2)") == (0, 1, 2) and parse_index("0,1") == (0, 1)
    for shape, channel, index in (
        ((4, 3, 5, 5), None, (0, 0, 0)),
        ((4, 3, 5, 5), None, (0, 3, 0, 0)),
        ((4, 3, 5, 5), None, (0, 0, 0, -1)),
        ((4, 3, 5, 5), 1, (0, 2, 0, 0)),
        ((4, 3, 5, 5), 3, None),
    ):
        with pytest.raises(UsageError):
            choose_element(shape, channel, index)
    with pytest.raises(UsageError):
        parse_index("0,x")


def test_unknown_layer_suggests() -> None:
    net, x = forum_situation()
    with pytest.raises(UsageError) as e:
        explain(net, x, layer="bn1")
    assert e.value.hint is not None and "did you mean bn?" in e.value.hint
    with pytest.raises(UsageError, match="did not run"):
        explain(net, x, layer="bn#2")


def test_explanation_is_typed() -> None:
    net, x = forum_situation()
    exp = explain(net, x, layer="bn", model_name="m.pt", input_name="x.pt")
    assert isinstance(exp, Explanation) and (exp.model, exp.input) == ("m.pt", "x.pt")
    with pytest.raises(AttributeError):
        exp.model = "other"  # type: ignore[misc]


def test_forum_numbers_read_in_the_terminal() -> None:
    import io

    from bn_diff.render.console import make_console
    from bn_diff.render.explain import render_explain

    net, x = forum_situation()
    buf = io.StringIO()
    render_explain(explain(net, x, layer="bn"), make_console(file=buf, no_color=True, width=100))
    lines = buf.getvalue().splitlines()
    assert any(ln.split() == ["x", "-0.0403"] for ln in lines)
    out = next(ln for ln in lines if ln.strip().startswith("PyTorch's output"))
    assert out.split()[2] == "-1.6799" and "PyTorch agrees" in out
    assert any("0.8352 · (-2.01137) + 0 = -1.6799" in ln for ln in lines)
    no_norm = next(ln for ln in lines if "no normalization" in ln)
    assert no_norm.split()[0] == "-0.0336586"


class FrozenBatchNorm2d(nn.Module):
    """As in torchvision: buffers only, always the stored statistics."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.eps = 1e-5
        for name, value in (
            ("weight", 2.0),
            ("bias", 0.5),
            ("running_mean", 0.1),
            ("running_var", 3.0),
        ):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Functional(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, training=True)


def test_frozen_bn_and_functional_calls() -> None:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    frozen = explain(
        nn.Sequential(OrderedDict(fbn=FrozenBatchNorm2d(3))), x, layer="fbn", channel=2
    )
    assert frozen.layer.stats == "running" and not frozen.side_effects.changes
    assert frozen.element.y_by_hand == pytest.approx(
        2 * (frozen.element.x - 0.1) / math.sqrt(3 + 1e-5) + 0.5
    )
    assert frozen and "train_batch" in [a.id for a in frozen.alternatives]
    assert "read, not written" in frozen.side_effects.notes[0]

    func = explain(Functional(), x, layer="(model):F.batch_norm")
    assert func.layer.printed.startswith("F.batch_norm(training=True")
    assert func and func.channel.running_mean is None
    assert [a.id for a in func.alternatives][-1] == "eval_same"
    with pytest.raises(UsageError) as e:
        explain(Functional(), x, layer="(model):F.batch_nrm")
    assert e.value.hint == "did you mean (model):F.batch_norm?"


class EpsTypo(nn.BatchNorm2d):
    """A BatchNorm2d whose forward uses eps = 1e-3 while it says 1e-5: PyTorch's output is off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, rm, rv = self.weight, self.bias, self.running_mean, self.running_var
        return F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3)


def test_a_disagreeing_layer_is_said_and_its_reading_found() -> None:
    bn = EpsTypo(2).eval()
    with torch.no_grad():
        bn.running_var.fill_(0.01)
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    exp = explain(nn.Sequential(OrderedDict(bn=bn)), x, layer="bn")
    assert not exp and abs(exp.element.difference) > exp.element.allowed
    matching = [a.id for a in exp.alternatives if a.matches_pytorch]
    assert matching == ["eps_0.001"]
