"""The CUDA paths: autocast, channels_last, the fused residual add, torch.compile, fine-tuning with AMP.

Skipped where there is no GPU (CI has none); `benchmarks/gpu_checks.sh` runs them on a GPU machine.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import se_retrofit
from se_retrofit import SEConfig, SERetrofitWarning
from se_retrofit.finetune import finetune
from se_retrofit.models import create_model

from conftest import make_pretrained_like
from test_finetune import _Reads, Quadrants, pretrained_like

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(name: str = "resnet18", **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = make_pretrained_like(timm.create_model(name)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SERetrofitWarning)
        retro = se_retrofit.apply(base, SEConfig(**config)).eval()
    return base.cuda().to(memory_format=torch.channels_last), retro.cuda().to(memory_format=torch.channels_last)


def _input(batch: int = 4, size: int = 96) -> torch.Tensor:
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x.cuda().contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "fp32"])
def test_identity_retrofit_keeps_outputs_on_cuda(dtype):
    base, retro = _pair()
    x = _input()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        a, b = base(x), retro(x)
    assert b.dtype == a.dtype, f"output dtype changed under autocast: {a.dtype} -> {b.dtype}"
    diff = (a.float() - b.float()).abs().max().item()
    assert diff == 0.0, f"identity retrofit changed the CUDA output ({dtype}) by {diff}"


def test_fused_and_unfused_agree_under_bf16_autocast():
    _, fused = _pair(init="paper")
    _, plain = _pair(init="paper", fuse_add=False)
    plain.load_state_dict(fused.state_dict())
    x = _input()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fused(x).float(), plain(x).float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 2e-2, f"bf16 outputs of the fused and unfused models differ by {rel:.4f} (relative norm)"


def test_compiled_retrofit_matches_eager_on_cuda():
    _, retro = _pair(init="paper")
    x = _input()
    compiled = torch.compile(retro)
    with torch.no_grad():
        eager, comp = retro(x), compiled(x)
    assert torch.allclose(eager, comp, rtol=1e-3, atol=1e-3), f"compiled output differs by {(eager - comp).abs().max()}"


@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16"])
def test_finetune_on_cuda_with_amp_and_channels_last(amp_dtype):
    model = pretrained_like(create_model("resnet10t", num_classes=3))
    result = finetune(model, Quadrants(32), Quadrants(9, seed=1), epochs=2, batch_size=8, device="cuda",
                      amp=True, amp_dtype=amp_dtype, channels_last=True, verbose=False, progress=False)
    assert result.config["runtime"]["amp_dtype_used"] == amp_dtype
    losses = [row["train_loss"] for row in result.history]
    assert all(torch.isfinite(torch.tensor(losses))), f"non-finite training loss with {amp_dtype}: {losses}"
    fc2 = [m.fc2.weight for _, m in se_retrofit.se_blocks(result.model)]
    assert any(w.abs().sum() > 0 for w in fc2), "SE blocks did not train on the GPU"
    assert all(p.dtype == torch.float32 for p in result.model.parameters()), "AMP must keep float32 weights"


@pytest.mark.parametrize("amp", [False, True])
def test_a_nan_loss_on_cuda_stops_the_run(amp):
    """The NaN check keeps its flag on the GPU and reads it every few steps: under AMP (float16, whose
    GradScaler skips steps with inf gradients rather than failing) the run must still stop at the first
    NaN loss, not train on to "done"."""
    with pytest.raises(RuntimeError, match=r"NaN or inf at epoch 1/1, step 1 \(of 4\)"):
        finetune(create_model("resnet10t"), _Reads(8), None, epochs=1, batch_size=2, device="cuda",
                 verbose=False, progress=False, **({"amp": True, "amp_dtype": "float16"} if amp else {}))


def test_weights_overflowed_on_cuda_are_not_saved(tmp_path):
    """lr 1e30: the step's loss is finite but the weights overflow; the check of the weights before a save
    runs on the GPU's tensors, and last.pt keeps the last finite weights."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"trainable weights are NaN or inf at epoch 2/3"):
        finetune(create_model("resnet10t"), Quadrants(8), Quadrants(4), out_dir=out, epochs=3,
                 batch_size=8, lr=1e30, opt="sgd", warmup_epochs=0, device="cuda", verbose=False, progress=False)
    assert not (out / "model.safetensors").exists(), "final weights were written"
    saved = torch.load(out / "last.pt", weights_only=False, map_location="cpu")["model"]
    broken = [k for k, v in saved.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not broken, f"last.pt holds non-finite tensors: {broken[:5]}"
