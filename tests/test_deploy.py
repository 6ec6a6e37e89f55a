"""Deployment of retrofitted zoo models: torch.export, ONNX (dynamo exporter, onnxruntime), torch.compile,
and persistence (deepcopy, torch.save in a fresh process, state_dict through safetensors).

Every model is retrofitted with ``init="paper"`` so that the gates are not 1 and the SE blocks change the
outputs (checked by ``retrofitted``); an export that dropped them would then fail the comparison. The fast
tests use timm/torchvision ResNet-18 and ConvNeXt-atto at 64 px; the models the issue names (ResNet-50,
ConvNeXt-Tiny) and inductor compilation are ``slow``. ONNX tests need the ``onnx`` extra
(``pip install -e .[onnx]``) and are skipped without it.
"""
from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torchvision

import se_retrofit

from conftest import make_pretrained_like
from models_custom import AddSpelling, FunctionalDropoutBlock, Net

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
# Another batch size: the exports below mark the batch dimension dynamic.
X_OTHER = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(12))
ONNX_ATOL = 1e-5

SLOW_ZOO = [pytest.param(spec, marks=pytest.mark.slow) for spec in
            ("timm:resnet50", "timm:convnext_tiny", "torchvision:resnet50", "torchvision:convnext_tiny")]


def build(spec: str, seed: int = 0) -> torch.nn.Module:
    lib, name = spec.split(":")
    model = torchvision.models.get_model(name) if lib == "torchvision" else timm.create_model(name)
    return make_pretrained_like(model, seed).eval()


def retrofit(model: torch.nn.Module, config: se_retrofit.SEConfig | None = None, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        return se_retrofit.apply(model, config, **kwargs).eval()


@functools.lru_cache(maxsize=None)
def retrofitted(spec: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(original, retrofitted with init="paper"), both in eval mode; shared by the tests, never modified."""
    model = build(spec)
    se_model = retrofit(model, init="paper")
    assert se_retrofit.se_blocks(se_model), f"{spec}: no SE block inserted"
    with torch.no_grad():
        change = (se_model(X) - model(X)).abs().max().item()
    assert change > 1e-3, f"{spec}: SE blocks do not change the outputs ({change}); the comparisons would be vacuous"
    return model, se_model


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# --------------------------------------------------------------------------------------- torch.export


def check_export(spec: str) -> None:
    _, se_model = retrofitted(spec)
    n_se = len(se_retrofit.se_blocks(se_model))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(se_model, (X,), dynamic_shapes=({0: batch},))
    sigmoids = sum(node.target == torch.ops.aten.sigmoid.default for node in program.graph.nodes)
    assert sigmoids == n_se, f"{spec}: exported graph has {sigmoids} sigmoid gates for {n_se} SE blocks"
    exported = program.module()
    for x in (X, X_OTHER):
        # Eager bottlenecks take the squeeze before conv3/bn3 (early_squeeze), exported graphs the plain
        # one: the same value up to float32 rounding.
        want = eager(se_model, x)
        diff = max_diff(eager(exported, x), want)
        assert diff <= 1e-5 * want.abs().max().item(), (
            f"{spec}: exported program differs from eager by {diff} at batch {x.shape[0]}")


@pytest.mark.parametrize("spec", ["timm:resnet18", "timm:convnext_atto"])
def test_torch_export_matches_eager(spec):
    check_export(spec)


def test_fx_post_training_quantization_keeps_the_se_blocks():
    """``prepare_fx`` traced the SE block's ``view(gate.shape + (1, 1))`` and put an observer on the size
    arithmetic: the first calibration forward failed inside torch's observer code. Now the model prepares,
    calibrates and converts; int8 costs a few percent, the SE blocks' effect is far larger."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    base, se_model = retrofitted("timm:resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantization is deprecated in favour of torchao's pt2e
        prepared = prepare_fx(copy.deepcopy(se_model), get_default_qconfig_mapping("x86"), (X,))
        with torch.no_grad():
            prepared(X), prepared(X_OTHER)
        quantized = convert_fx(prepared)
    n_se = len(se_retrofit.se_blocks(se_model))
    sigmoids = sum("sigmoid" in str(node.target) for node in quantized.graph.nodes)
    assert sigmoids == n_se, f"the quantized graph has {sigmoids} sigmoid gates for {n_se} SE blocks"
    want = eager(se_model, X)
    error, se_effect = max_diff(eager(quantized, X), want), max_diff(eager(base, X), want)
    assert error <= 0.15 * want.abs().max().item() and error < se_effect / 10, (
        f"int8 model differs from the float retrofit by {error} (the SE blocks change the output by {se_effect})")


def test_the_in_place_add_stays_out_of_graphs_exported_without_autograd():
    """Under ``no_grad`` the eager SE block writes the sum into ``x`` (``addcmul(..., out=x)``); an exported
    graph plans its own memory and must hold the plain ``addcmul``."""
    _, se_model = retrofitted("timm:resnet18")
    with torch.no_grad():
        program = torch.export.export(se_model, (X,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if t.endswith(".out")], f"out= ops in the exported graph: {targets}"
    assert sum(t == "aten.addcmul.default" for t in targets) == len(se_retrofit.se_blocks(se_model))


@pytest.mark.parametrize("spec", SLOW_ZOO)
def test_torch_export_matches_eager_named_models(spec):
    check_export(spec)


# --------------------------------------------------------------------------------------- ONNX


def check_onnx(spec: str, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, se_model = retrofitted(spec)
    n_se = len(se_retrofit.se_blocks(se_model))
    program = torch.onnx.export(se_model, (X,), dynamo=True, dynamic_shapes=({0: "batch"},))
    path = tmp_path / "model.onnx"
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    sigmoids = sum(node.op_type == "Sigmoid" for node in proto.graph.node)
    assert sigmoids == n_se, f"{spec}: ONNX graph has {sigmoids} Sigmoid nodes for {n_se} SE blocks"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for x in (X, X_OTHER):
        (out,) = session.run(None, {name: x.numpy()})
        diff = max_diff(torch.from_numpy(out), eager(se_model, x))
        assert diff <= ONNX_ATOL, f"{spec}: onnxruntime differs from eager by {diff} at batch {x.shape[0]}"


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    check_onnx("timm:resnet10t", tmp_path)


@pytest.mark.parametrize("spec", ["timm:convnext_atto", *SLOW_ZOO])
@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_named_models(spec, tmp_path):
    check_onnx(spec, tmp_path)


# --------------------------------------------------------------------------------------- torch.compile


def explain(model: torch.nn.Module, x: torch.Tensor):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)(x)


def graphs(explanation) -> str:
    reasons = [str(b.reason)[:300] for b in explanation.break_reasons]
    return f"{explanation.graph_count} graph(s), {explanation.graph_break_count} break(s) {reasons}"


def assert_one_graph(model: torch.nn.Module, se_model: torch.nn.Module, x: torch.Tensor, what: str) -> None:
    before = explain(model, x)
    assert (before.graph_count, before.graph_break_count) == (1, 0), \
        f"{what}: the ORIGINAL model already does not compile to one graph ({graphs(before)}); not the retrofit's doing"
    after = explain(se_model, x)
    assert (after.graph_count, after.graph_break_count) == (1, 0), \
        f"{what}: the retrofit breaks the graph: {graphs(after)} (original: {graphs(before)})"


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_compile_sees_one_graph(spec):
    model, se_model = retrofitted(spec)
    assert_one_graph(model, se_model, X, spec)


def test_compile_sees_one_graph_through_the_train_eval_dispatch():
    """A block that branches on ``self.training`` gets two generated forwards and a dispatch: one graph per mode."""
    model = make_pretrained_like(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16, p=0.0)]))
    se_model = retrofit(model, init="paper")
    assert hasattr(type(se_model.blocks[1]), "_se_forward_train"), "the dispatch this test is about is gone"
    x = X[:, :, :16, :16]
    for mode in ("eval", "train"):
        model.train(mode == "train")
        se_model.train(mode == "train")
        assert_one_graph(model, se_model, x, f"custom net, {mode} mode")


def test_compiled_model_matches_eager_and_follows_the_mode():
    """fullgraph=True fails on any graph break; aot_eager checks dynamo + AOTAutograd without C++ builds."""
    model = make_pretrained_like(Net([AddSpelling(16, "plus"), FunctionalDropoutBlock(16, p=0.0)]))
    se_model = retrofit(model, init="paper")
    x = X[:, :, :16, :16]
    torch._dynamo.reset()
    compiled = torch.compile(se_model, backend="aot_eager", fullgraph=True)
    expected_eval = eager(se_model.eval(), x)
    diff = max_diff(eager(compiled, x), expected_eval)
    assert diff == 0.0, f"compiled (eval) differs from eager by {diff}"
    se_model.train()
    x_train = x.clone().requires_grad_(True)
    out = compiled(x_train)
    out.sum().backward()
    grad_compiled = x_train.grad.clone()
    x_train.grad = None
    expected = se_model(x_train)
    expected.sum().backward()
    assert max_diff(out, expected_eval) > 1e-4, "train-mode output equals eval-mode: the compiled model kept the eval graph"
    assert max_diff(out, expected) <= 1e-6, f"compiled (train) differs from eager by {max_diff(out, expected)}"
    assert max_diff(grad_compiled, x_train.grad) <= 1e-6, "compiled gradients differ from eager"


def test_compiled_zoo_model_matches_eager():
    _, se_model = retrofitted("timm:resnet18")
    torch._dynamo.reset()
    compiled = torch.compile(se_model, backend="aot_eager", fullgraph=True)
    diff = max_diff(eager(compiled, X), eager(se_model, X))
    assert diff == 0.0, f"compiled differs from eager by {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18", "timm:convnext_atto"])
def test_inductor_compiled_model_matches_eager(spec):
    """The default backend (inductor, C++ code on the CPU): one graph, outputs within float rounding."""
    _, se_model = retrofitted(spec)
    torch._dynamo.reset()
    compiled = torch.compile(se_model, fullgraph=True)
    for x in (X, X_OTHER):
        diff = max_diff(eager(compiled, x), eager(se_model, x))
        assert diff <= 1e-5, f"{spec}: inductor output differs from eager by {diff} at batch {x.shape[0]}"


# --------------------------------------------------------------------------------------- persistence


def test_zoo_model_deep_copies():
    _, se_model = retrofitted("timm:resnet18")
    twin = copy.deepcopy(se_model)
    assert type(twin.layer1[0]) is type(se_model.layer1[0]), "deepcopy changed the generated block class"
    assert se_retrofit.get_config(twin) == se_retrofit.get_config(se_model), "deepcopy lost the SEConfig"
    assert max_diff(eager(twin, X), eager(se_model, X)) == 0.0, "deepcopy changed the outputs"
    with torch.no_grad():
        twin.layer1[0].se.fc2.bias.add_(1.0)
    assert max_diff(eager(twin, X), eager(se_model, X)) > 0.0, "the copy shares SE weights with the original"


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_state_dict_round_trips_through_safetensors(spec, tmp_path):
    from safetensors.torch import load_file, save_file

    _, se_model = retrofitted(spec)
    path = tmp_path / "model.safetensors"
    save_file(se_model.state_dict(), str(path))
    fresh = retrofit(build(spec, seed=1), se_retrofit.get_config(se_model))
    for _, block in se_retrofit.se_blocks(fresh):
        torch.nn.init.normal_(block.fc2.weight, std=0.1)
    assert max_diff(eager(fresh, X), eager(se_model, X)) > 1e-3, "the fresh model already matches: vacuous test"
    result = fresh.load_state_dict(load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    diff = max_diff(eager(fresh, X), eager(se_model, X))
    assert diff == 0.0, f"{spec}: model loaded from safetensors differs by {diff}"


CHILD = """
import json, sys, torch
torch.set_num_threads(1)
x, y = torch.load(sys.argv[1] + "/x.pt"), torch.load(sys.argv[1] + "/y.pt")
program = torch.export.load(sys.argv[1] + "/model.pt2")
needs = [m for m in ("se_retrofit", "timm") if m in sys.modules]
with torch.no_grad():
    exported = float((program.module()(x) - y).abs().max())
model = torch.load(sys.argv[1] + "/model.pt", weights_only=False).eval()
import se_retrofit
with torch.no_grad():
    pickled = float((model(x) - y).abs().max())
print(json.dumps({"exported": exported, "pt2_imported": needs, "pickled": pickled,
                  "blocks": len(se_retrofit.se_blocks(model)), "config": se_retrofit.get_config(model).to_dict()}))
"""


@pytest.mark.parametrize("spec", ["timm:resnet18", pytest.param("torchvision:convnext_tiny", marks=pytest.mark.slow)])
def test_saved_model_and_exported_program_load_in_a_fresh_process(spec, tmp_path):
    """``torch.save(model)`` and ``torch.export.save`` files load in a new interpreter; the .pt2 without se_retrofit."""
    _, se_model = retrofitted(spec)
    torch.save(se_model, tmp_path / "model.pt")
    torch.export.save(torch.export.export(se_model, (X,)), tmp_path / "model.pt2")
    torch.save(X, tmp_path / "x.pt")
    torch.save(eager(se_model, X), tmp_path / "y.pt")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{spec}: loading in a fresh process failed:\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["pickled"] == 0.0, f"{spec}: torch.load'ed model differs by {result['pickled']}"
    assert result["exported"] == 0.0, f"{spec}: loaded ExportedProgram differs by {result['exported']}"
    assert result["pt2_imported"] == [], f"loading the .pt2 imported {result['pt2_imported']}"
    assert result["blocks"] == len(se_retrofit.se_blocks(se_model)), result
    assert result["config"] == se_retrofit.get_config(se_model).to_dict(), result


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_a_repvgg_style_block_fuses_with_its_se_block_moved_into_its_attention_slot(name):
    """timm's ``reparameterize_model`` fuses a RepVGG-style block's branches into one convolution, and the
    fused forward applies the block's ``attn`` slot to it: where ``apply`` put SE, on the branches' sum.

    In float64: a randomly initialised mobileone_s0 with paper-initialised SE blocks is chaotic (a change of
    1e-7 in its input changes its float32 output by about 14 %), so float32 rounding alone, fused or not,
    would decide the comparison."""
    from timm.utils.model import reparameterize_model

    from se_retrofit.testing import perturb_norms

    model = perturb_norms(timm.create_model(name, pretrained=False)).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model, init="paper")
    fused = reparameterize_model(se_model)
    blocks = [m for m in fused.modules() if hasattr(m, "reparam_conv")]
    assert blocks and all(m.reparam_conv is not None and not hasattr(m, "conv_kxk") for m in blocks), \
        f"{name}: not every block was fused"
    assert len(se_retrofit.se_blocks(fused)) == len(se_retrofit.se_blocks(se_model)) > 0, "fusion dropped SE blocks"
    assert all(isinstance(m.attn, se_retrofit.SEBlock) for m in blocks), "the SE blocks should be in the attn slots"
    assert not any(type(m).__name__.startswith("SE") for m in blocks), "a fused block keeps the generated forward"
    assert all(hasattr(m, "conv_kxk") for m in se_model.modules() if hasattr(m, "reparam_conv")), \
        "reparameterize_model fuses a copy: the retrofitted model must keep its branches"
    assert all(p.requires_grad for _, se in se_retrofit.se_blocks(fused) for p in se.parameters()), \
        "the block's own clean-up (timm detaches every parameter but the fused convolution's) froze the SE blocks"
    with torch.no_grad():
        expected = se_model(X.double())
        diff = (fused(X.double()) - expected).abs().max().item()
    assert diff <= 1e-8 * expected.abs().max().item(), f"{name}: the fused model differs by {diff}"


def test_an_adapter_is_not_saved_from_a_re_parameterised_model(tmp_path):
    """Fusion moves the SE blocks into the attention slots, under names a re-run apply (which load does)
    never makes: saving then says so, rather than writing an adapter load refuses as the wrong base."""
    from timm.utils.model import reparameterize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(timm.create_model("repvgg_a0", pretrained=False).eval())
    with pytest.raises(ValueError, match="attention slot: a deploy re-parameterisation .* before re-parameterising"):
        se_retrofit.save_adapter(reparameterize_model(se_model), tmp_path)


@pytest.mark.parametrize("name, method, why", [
    ("repvit_m0_9", "fuse", "returns a new module in place of the block"),
    ("fastvit_t8", "reparameterize", "no attention slot"),  # a stem block's SE sits on a branch, before its sum
])
def test_deploy_time_fusion_that_would_drop_or_move_se_is_refused_with_the_way_out(name, method, why):
    """``fuse()`` returns a plain module without the SE block; a block whose SE is not on the sum the fusion
    leaves (SE on a residual branch) has no slot to keep it in. Both must stop with the reason, not crash later
    or drop SE."""
    from timm.utils.model import reparameterize_model

    model = timm.create_model(name, pretrained=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model)
    with pytest.raises(RuntimeError, match=rf"\.{method}\(\) cannot run on this block se_retrofit rewrote: .*{why}.*"
                                           "before se_retrofit.apply"):
        reparameterize_model(se_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)  # RepVGG fused has no residual left
        fused_first = se_retrofit.apply(reparameterize_model(model))
    with torch.no_grad():
        assert torch.equal(fused_first(X), reparameterize_model(model)(X)), \
            f"{name}: re-parameterised before apply, the model should keep its outputs"


class _TwoSlots(torch.nn.Module):
    """Two parallel convolutions fused by ``reparameterize()``; the fused forward applies ``se`` only, the
    training forward ``se`` then ``attn``: an identity-initialised SE block would compute the same in
    either slot, so only a check with a real gate finds the right one."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv_a = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_b = torch.nn.Conv2d(channels, channels, 1)
        self.attn = torch.nn.Identity()
        self.se = torch.nn.Identity()
        self.reparam = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam is not None:
            return torch.relu(self.se(self.reparam(x)))
        return torch.relu(self.attn(self.se(self.conv_a(x) + self.conv_b(x))))

    def reparameterize(self) -> None:
        weight = self.conv_a.weight.detach().clone()
        weight[:, :, 1:2, 1:2] += self.conv_b.weight.detach()
        self.reparam = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
        self.reparam.weight.data = weight
        self.reparam.bias.data = (self.conv_a.bias + self.conv_b.bias).detach()
        del self.conv_a, self.conv_b


class _FusesThroughTheOtherMethod(_TwoSlots):
    """GhostNetV3's pattern: ``reparameterize()`` calls ``switch_to_deploy()``, which fuses."""

    def reparameterize(self) -> None:
        self.switch_to_deploy()

    def switch_to_deploy(self) -> None:
        _TwoSlots.reparameterize(self)


class _FirstSlotRaises(_TwoSlots):
    """The fused forward calls ``attn`` on a one-channel map: the SE block there raises, in ``se`` it fits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam is not None:
            return torch.relu(self.se(self.reparam(x))) + 0 * self.attn(x[:, :1]).sum()
        return torch.relu(self.attn(self.se(self.conv_a(x) + self.conv_b(x))))


def _retrofitted(block: torch.nn.Module, init: str = "paper") -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), block, torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    se_model = se_retrofit.apply(model, init=init)
    assert len(se_retrofit.se_blocks(se_model)) == 1, se_retrofit.get_plan(se_model)
    return se_model


@pytest.mark.parametrize("block", [_FusesThroughTheOtherMethod, _FirstSlotRaises], ids=lambda c: c.__name__)
def test_fusion_finds_the_slot_through_a_method_calling_another_or_a_slot_that_raises(block):
    from timm.utils.model import reparameterize_model

    se_model = _retrofitted(block())
    fused = reparameterize_model(se_model)
    assert isinstance(fused[1].se, se_retrofit.SEBlock) and isinstance(fused[1].attn, torch.nn.Identity), fused[1]
    with torch.no_grad():
        diff = (fused(X) - se_model(X)).abs().max().item()
    assert diff < 1e-5, f"the fused model differs by {diff}"


def test_fusion_runs_in_half_precision_and_under_autocast_and_not_the_user_hooks():
    """The check is about where the SE block goes: it runs in float64, without autocast or hooks; the block
    itself fuses in its own dtype."""
    from timm.utils.model import reparameterize_model

    model = timm.create_model("repvgg_a0", pretrained=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model, init="paper")
    calls = []
    se_model.stages[0][0].register_forward_hook(lambda module, args, out: calls.append(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = reparameterize_model(se_model)
    assert calls == [], f"the user's hook ran {len(calls)} times during the fusion"
    half = reparameterize_model(copy.deepcopy(se_model).to(torch.bfloat16))
    for each in (fused, half):
        assert all(isinstance(m.attn, se_retrofit.SEBlock) for m in each.modules() if hasattr(m, "reparam_conv"))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_fusion_checks_the_slot_with_a_real_gate_not_the_identity_init():
    from timm.utils.model import reparameterize_model

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _TwoSlots(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    se_model = se_retrofit.apply(model, init="identity")
    assert len(se_retrofit.se_blocks(se_model)) == 1, se_retrofit.get_plan(se_model)
    fused = reparameterize_model(se_model)
    block = fused[1]
    assert isinstance(block.se, se_retrofit.SEBlock) and isinstance(block.attn, torch.nn.Identity), \
        f"the SE block went into the wrong slot: se={type(block.se).__name__}, attn={type(block.attn).__name__}"
    with torch.no_grad():  # trained SE weights: the fused model must still apply them
        for p in se_retrofit.se_blocks(se_model)[0][1].parameters():
            p.normal_(0, 0.5)
        block.se.load_state_dict(se_retrofit.se_blocks(se_model)[0][1].state_dict())
        diff = (fused(X) - se_model(X)).abs().max().item()
    assert diff < 1e-5, f"the fused model ignores its SE block: differs by {diff}"


def test_a_model_whose_re_parameterisable_layers_sit_on_residual_branches_still_fuses():
    """RepGhostNet's ghost modules are layers of its bottlenecks' branches: SE goes on the bottleneck,
    the ghost modules stay as they were, and ``reparameterize_model`` fuses them with every SE kept."""
    from timm.utils.model import reparameterize_model

    from se_retrofit.testing import perturb_norms

    model = perturb_norms(timm.create_model("repghostnet_050", pretrained=False)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.SERetrofitWarning)
        se_model = se_retrofit.apply(model, init="paper")
    fused = reparameterize_model(se_model)
    assert len(se_retrofit.se_blocks(fused)) == len(se_retrofit.se_blocks(se_model)) > 0, "fusion dropped SE blocks"
    assert not any(len(getattr(m, "fusion_bn", ())) for m in fused.modules()), "the ghost modules were not fused"
    with torch.no_grad():
        diff = (fused(X) - se_model(X)).abs().max().item()
    assert diff < 1e-4, f"re-parameterised retrofitted model differs by {diff}"


class _BlockWithFuseHelper(torch.nn.Module):
    """A ``fuse(a, b)`` that is no deploy step: a helper the parent calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))

    def forward(self, x):
        return x + self.conv(x)

    def fuse(self, a, b):
        return torch.cat([a, b], dim=1)


class _UsesTheHelper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 1)
        self.block = _BlockWithFuseHelper()

    def forward(self, x):
        y = self.block(self.stem(x))
        return self.block.fuse(y, y)


def test_a_fuse_method_with_arguments_is_no_deploy_step_and_keeps_working():
    model = _UsesTheHelper().eval()
    se_model = se_retrofit.apply(model)
    assert se_retrofit.se_blocks(se_model), "the block should get SE"
    with torch.no_grad():
        assert torch.equal(se_model(X), model(X)), "the helper must still run after apply"
