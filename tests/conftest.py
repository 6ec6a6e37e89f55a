"""Shared helpers for the tests: models that behave like trained ones, and state-dict comparisons."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch.fx as fx

from se_retrofit import SEBlock
from se_retrofit.early_excitation import gate_through
from se_retrofit.testing import perturb_norms


def make_pretrained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    return perturb_norms(model, seed)


class _GeneratedForwardTracer(fx.Tracer):
    """Traces a retrofitted block's generated forward as written: SE blocks and gate_through stay calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(gate_through,))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SEBlock) or super().is_leaf_module(m, qualname)


def the_se_call(block: nn.Module) -> fx.Node:
    """The one SE call node of a retrofitted block's generated forward (its graph is ``node.graph``)."""
    calls = [n for n in _GeneratedForwardTracer().trace(block).nodes
             if n.op == "call_module" and isinstance(block.get_submodule(n.target), SEBlock)]
    if len(calls) != 1:
        raise AssertionError(f"expected one SE call in the block, found {len(calls)}")
    return calls[0]


def assert_original_state_kept(original: nn.Module, retrofitted: nn.Module) -> None:
    before = original.state_dict()
    after = retrofitted.state_dict()
    missing = [k for k in before if k not in after]
    assert not missing, f"original state_dict keys lost by the retrofit: {missing[:5]}"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"original tensors changed by the retrofit: {changed[:5]}"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin and run 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
