"""SE adapters: save only the SE weights (and named extras), rebuild the fine-tuned model on a base model."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import se_retrofit
from se_retrofit.adapter import CONFIG_NAME, WEIGHTS_NAME, load, save_adapter, se_state_dict
from se_retrofit.models import create_model, reset_classifier
from se_retrofit.se_block import SEBlock, se_blocks

SMALL = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomise(module: nn.Module, seed: int) -> None:
    """Stand-in for fine-tuning: weights that differ from anything apply or the base model starts with."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(SMALL)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """A resnet10t whose residual branches are live: fresh timm ResNets zero each branch's last BN,
    which would make every SE block multiply zeros and the output checks below pass vacuously."""
    torch.manual_seed(0)
    model = create_model("resnet10t", pretrained=False, num_classes=10)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tuned(base) -> nn.Module:
    model = se_retrofit.apply(base, reduction=8, example_input=SMALL)
    assert se_blocks(model), "apply inserted no SE block into resnet10t; the adapter tests need some"
    for i, (_, block) in enumerate(se_blocks(model)):
        randomise(block, seed=i)
    randomise(model.fc, seed=100)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tuned, tmp_path_factory):
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) outside the SE blocks changed since se_retrofit.apply \(fc.bias, "
                      r"fc.weight\)"):  # the head was trained but is not saved: the adapter keeps the base's
        se_only = save_adapter(tuned, tmp_path_factory.mktemp("se_only"), base_model="resnet10t")
    with_head = save_adapter(tuned, tmp_path_factory.mktemp("with_head") / "adapter", base_model="resnet10t",
                             extra_modules=("fc",))
    return se_only, with_head


def test_se_state_dict_holds_exactly_the_se_weights(tuned):
    state = se_state_dict(tuned)
    names = [name for name, _ in se_blocks(tuned)]
    expected = {f"{n}.{k}" for n in names for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    assert set(state) == expected, f"unexpected keys {sorted(set(state) ^ expected)[:5]}"
    full = tuned.state_dict()
    assert all(torch.equal(state[k], full[k]) for k in state), "se_state_dict values differ from the model's"


def test_adapter_files_hold_only_se_weights_and_the_config(saved, tuned):
    directory, _ = saved
    assert (directory / WEIGHTS_NAME).is_file() and (directory / CONFIG_NAME).is_file(), list(directory.iterdir())
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    expected = set(se_state_dict(tuned))
    assert keys == expected, f"adapter keys differ from the SE blocks': {sorted(keys ^ expected)[:5]}"
    meta = json.loads((directory / CONFIG_NAME).read_text())
    assert meta["se_config"] == se_retrofit.get_config(tuned).to_dict(), meta["se_config"]
    assert meta["se_config"]["reduction"] == 8
    assert meta["se_modules"] == [n for n, _ in se_blocks(tuned)], meta["se_modules"]
    assert meta["base_model"] == "resnet10t" and meta["se_retrofit_version"] == se_retrofit.__version__
    assert meta["format_version"] == 1 and meta["extra_modules"] == [] and meta["classifier"] is None, meta


def test_load_rebuilds_the_fine_tuned_model_without_touching_the_base(saved, base, tuned):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    se_only, with_head = saved
    loaded = load(with_head, base, example_input=SMALL)
    assert not se_blocks(base), "load must not add SE blocks to the base model"
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "load changed the base weights"
    assert [n for n, _ in se_blocks(loaded)] == [n for n, _ in se_blocks(tuned)]
    assert se_retrofit.get_config(loaded) == se_retrofit.get_config(tuned), "the loaded model should carry its config"
    assert torch.allclose(outputs(loaded), outputs(tuned), atol=1e-6), "loaded model computes something else"
    assert not torch.allclose(outputs(base), outputs(tuned), atol=1e-3), "control: the SE weights must matter"


def test_se_only_adapter_keeps_the_base_head(saved, base, tuned):
    """``tuned`` also changed its head; an adapter without it does not rebuild ``tuned``, which the base
    fingerprint notices (strict), and strict=False loads the SE weights onto the base head."""
    se_only, _ = saved
    with pytest.raises(ValueError) as info:
        load(se_only / WEIGHTS_NAME, base, example_input=SMALL)
    message = str(info.value)
    assert "in fc.bias, fc.weight alone" in message and "extra_modules=['fc']" in message \
        and "learned other features" not in message, f"the refusal should name the head left out: {message}"
    with pytest.warns(UserWarning, match="in fc.bias, fc.weight alone"):
        loaded = load(se_only / WEIGHTS_NAME, base, strict=False, example_input=SMALL)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in se_state_dict(tuned).items()), "SE weights not restored"
    assert torch.equal(loaded.fc.weight, base.fc.weight), "without extra_modules the head must stay the base's"
    assert not torch.allclose(outputs(loaded), outputs(base), atol=1e-3), \
        "control: with the base head, only the loaded SE weights can change the output, and they should"


def test_an_adapter_saved_before_changes_were_recorded_is_refused_as_before(saved, base, tmp_path):
    import shutil

    se_only, _ = saved
    older = shutil.copytree(se_only, tmp_path / "older")
    meta = json.loads((older / CONFIG_NAME).read_text())
    assert meta.pop("changed_since_apply")["tensors"].keys() == {"fc.weight", "fc.bias"}, meta
    (older / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not those adapter .* was trained on"):
        load(older, base, example_input=SMALL)
    meta["changed_since_apply"] = {"tensors": ["fc.weight"]}
    (older / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is damaged: wrong type of changed_since_apply"):
        load(older, base, example_input=SMALL)


def test_saved_head_resizes_an_imagenet_classifier(saved, base, tuned):
    _, with_head = saved
    meta = json.loads((with_head / CONFIG_NAME).read_text())
    assert meta["extra_modules"] == ["fc"] and meta["classifier"] == {"name": "fc", "num_classes": 10}, meta
    imagenet = copy.deepcopy(base)
    reset_classifier(imagenet, 1000)
    loaded = load(with_head, imagenet, example_input=SMALL)
    assert loaded.fc.out_features == 10, f"head has {loaded.fc.out_features} outputs, the adapter's has 10"
    assert torch.allclose(outputs(loaded), outputs(tuned), atol=1e-6), "head or SE weights not restored"


def test_wrong_base_model_is_refused_with_the_differing_names(saved):
    se_only, _ = saved
    other = create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="wrong base model") as info:
        load(se_only, other, example_input=SMALL)
    message = str(info.value)
    assert "layer1.1.se" in message and "resnet10t" in message, f"the error should list names and the base: {message}"
    with pytest.warns(UserWarning, match="wrong base model"):
        partial = load(se_only, other, strict=False, example_input=SMALL)
    with pytest.warns(UserWarning, match="not those adapter"):  # a fresh resnet10t: other weights
        saved_weights = se_state_dict(load(se_only, create_model("resnet10t", num_classes=10), strict=False,
                                           example_input=SMALL))
    assert torch.equal(partial.get_submodule("layer1.0.se").fc1.weight, saved_weights["layer1.0.se.fc1.weight"]), \
        "strict=False should still load the blocks whose names match"


def test_save_errors(tmp_path, base):
    with pytest.raises(ValueError, match="no SE blocks"):
        save_adapter(base, tmp_path)
    hand_built = nn.Sequential(nn.Conv2d(3, 8, 1))
    hand_built.add_module("se", SEBlock(8, 8))
    with pytest.raises(ValueError, match="config="):
        save_adapter(hand_built, tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists(), "nothing may be written when saving fails"


def test_a_config_that_differs_from_the_record_is_refused_at_save(tuned, tmp_path):
    """load() rebuilds the blocks from the saved config: one other than apply's wrote an adapter no model could
    load ("shape mismatch", blaming the base) (review r19a)."""
    other = dataclasses.replace(se_retrofit.get_config(tuned), reduction=se_retrofit.get_config(tuned).reduction * 2)
    with pytest.raises(ValueError, match="config= differs from the SEConfig apply recorded"):
        save_adapter(tuned, tmp_path, config=other)
    assert not any(tmp_path.iterdir()), "nothing may be written when saving fails"
    save_adapter(tuned, tmp_path, config=se_retrofit.get_config(tuned))  # the recorded one, given again: fine


def test_backbone_changes_since_apply_are_named_at_save_and_in_loads_refusal(base, tmp_path):
    """SE trained with a frozen backbone in a training-mode loop still moves batch-norm statistics: the
    adapter then fits only that changed backbone, and load's refusal blamed the base model alone."""
    model = se_retrofit.apply(base, example_input=SMALL)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    with pytest.warns(UserWarning, match=r"changed since se_retrofit.apply \(bn1.num_batches_tracked, "
                                         r"bn1.running_mean, bn1.running_var, \.\.\..*eval mode") as caught:
        save_adapter(model, tmp_path)
    assert any("tensor(s) outside the SE blocks" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"in bn1.num_batches_tracked, bn1.running_mean, bn1.running_var, \.\.\. "
                                         r".* alone .*batch-norm running statistics updated in a training-mode forward"):
        load(tmp_path, copy.deepcopy(base), example_input=SMALL)
    other = copy.deepcopy(base)  # another base as well: nothing to single out
    with torch.no_grad():
        other.layer1[0].conv1.weight.mul_(1.01)
    with pytest.raises(ValueError, match="not those adapter .* was trained on"):
        load(tmp_path, other, example_input=SMALL)


def test_a_model_converted_to_another_dtype_is_named_as_such(base, tmp_path):
    model = se_retrofit.apply(base, example_input=SMALL).double()
    with pytest.warns(UserWarning) as caught:
        save_adapter(model, tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("converted to another dtype" in m and "float32 -> float64" in m for m in messages), messages
    assert not any("running statistics" in m for m in messages), f"a conversion is not a BN-statistics change: {messages}"


def test_an_untouched_backbone_saves_without_a_warning(base, tmp_path):
    import warnings

    model = se_retrofit.apply(base, example_input=SMALL)
    randomise(se_blocks(model)[0][1], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path)


def test_blocks_changed_after_apply_are_refused_at_save(base, tmp_path):
    model = se_retrofit.apply(base, example_input=SMALL)
    name, block = se_blocks(model)[0]
    model.get_submodule(name.rpartition(".")[0]).se = SEBlock(block.channels, block.hidden * 2)
    with pytest.raises(ValueError, match=rf"not where its recorded apply call put them.* \({name}.*one se_retrofit.apply"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists(), "nothing may be written when saving fails"


def test_a_block_replaced_with_another_gain_is_refused_at_save(base, tmp_path):
    """Same width, another gain: load would rebuild the identity block's gain 2 under weights trained at 1."""
    model = se_retrofit.apply(base, example_input=SMALL)
    name, block = se_blocks(model)[0]
    model.get_submodule(name.rpartition(".")[0]).se = SEBlock(block.channels, block.hidden, gain=1.0)
    with pytest.raises(ValueError, match=rf"widths and gain it gave them \({name}"):
        save_adapter(model, tmp_path)


def test_state_entries_that_are_not_tensors(base, tmp_path):
    """A module's extra state is no weight: the fingerprints skip it, an adapter cannot hold it."""
    class Tagged(nn.Identity):
        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            pass

    model = copy.deepcopy(base)
    model.tag = Tagged()
    model = se_retrofit.apply(model, example_input=SMALL)
    save_adapter(model, tmp_path / "se")
    with pytest.raises(ValueError, match=r"extra module 'tag' holds dict entry tag._extra_state"):
        save_adapter(model, tmp_path / "tag", extra_modules=("tag",))


def test_class_names_travel_with_the_adapter(tmp_path, tuned):
    """Whoever gets only the adapter must be able to map outputs back to classes."""
    names = [f"class {i}" for i in range(10)]
    save_adapter(tuned, tmp_path, extra_modules=("fc",), class_names=names)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["class_names"] == names and meta["classifier"]["num_classes"] == 10, meta
    with pytest.raises(ValueError, match="class_names has 3 names but the classifier has 10 outputs"):
        save_adapter(tuned, tmp_path / "other", extra_modules=("fc",), class_names=["a", "b", "c"])
    assert not (tmp_path / "other").exists(), "nothing may be written when saving fails"


def test_unknown_extra_module_names_the_classifier(tmp_path, tuned):
    with pytest.raises(ValueError, match=r"'head'.*'fc'"):
        save_adapter(tuned, tmp_path, extra_modules=("head",))


def test_load_errors(tmp_path, saved, base, tuned):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere", base)
    se_only, _ = saved
    (tmp_path / WEIGHTS_NAME).write_bytes((se_only / WEIGHTS_NAME).read_bytes())
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load(tmp_path, base)
    meta = json.loads((se_only / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="upgrade se_retrofit"):
        load(tmp_path, base)
    for broken, what in (({"se_config": None}, "se_config"), ({"se_modules": "layer1.0.se"}, "se_modules"),
                         ({"classifier": ["fc", 10]}, "classifier"),
                         ({"classifier": {"name": "fc", "num_classes": "ten"}}, "classifier")):
        (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, **broken}))
        with pytest.raises(ValueError, match=f"damaged: wrong type of {what}"):
            load(tmp_path, base)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, "se_retrofit_version": "9.0",
                                                   "se_config": {**meta["se_config"], "new_option": 1}}))
    with pytest.raises(ValueError, match="unknown SEConfig option.*saved by se_retrofit 9.0.*upgrade se_retrofit"):
        load(tmp_path, base)
    with pytest.raises(ValueError, match="already has SE blocks"):
        load(se_only, tuned)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match="run folder without an SE adapter.*model.safetensors"):
        load(run, base)
    for name in ("model.safetensors", "best.safetensors"):  # a run's whole-model files, given to load by mistake
        (run / name).write_text("{}")
        with pytest.raises(ValueError, match=f"holds a whole model, not an SE adapter.*{name}"):
            load(run / name, base)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        save_adapter(tuned, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"


class _Wrapper(nn.Module):
    """A model whose only child is named ``module``: every key starts with ``module.`` legitimately."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_a_model_whose_keys_all_start_with_module_round_trips(base, tmp_path):
    wrapped = se_retrofit.apply(_Wrapper(copy.deepcopy(base)), reduction=8, example_input=SMALL)
    for i, (_, block) in enumerate(se_blocks(wrapped)):
        randomise(block, seed=i)
    save_adapter(wrapped, tmp_path, base_model="wrapper")
    loaded = se_retrofit.load(tmp_path, _Wrapper(copy.deepcopy(base)), example_input=SMALL)
    assert torch.equal(outputs(loaded), outputs(wrapped)), "the adapter of a 'module.'-keyed model did not round-trip"


def test_a_compiled_or_data_parallel_model_saves_the_names_of_the_model_inside(tuned, base, tmp_path):
    for wrapper in (lambda m: torch.compile(m), nn.DataParallel):
        folder = tmp_path / type(wrapper(nn.Identity())).__name__
        save_adapter(wrapper(tuned), folder, base_model="resnet10t", extra_modules=("fc",))
        loaded = se_retrofit.load(folder, base, example_input=SMALL)
        assert torch.allclose(outputs(loaded), outputs(tuned), atol=1e-6), \
            f"adapter saved through {folder.name} did not load back"


def test_a_base_with_other_weights_is_refused_unless_not_strict(saved, base):
    """Same architecture, other weights (another pretrained tag, another checkpoint): the SE blocks were
    trained on other features, so the adapter must not load silently."""
    se_only, _ = saved
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.layer1[0].conv1.weight.mul_(1.01)
    with pytest.raises(ValueError, match="not those adapter .* was trained on") as info:
        load(se_only, other, example_input=SMALL)
    assert "pass strict=False" in str(info.value), f"the refusal should say how to load anyway: {info.value}"
    with pytest.warns(UserWarning, match="not those adapter") as caught:
        loaded = load(se_only, other, strict=False, example_input=SMALL)
    warned = str(caught[0].message)
    assert "pass strict=False" not in warned and "loaded with strict=False" in warned, \
        f"the warning of a strict=False load should not suggest strict=False: {warned}"
    assert se_blocks(loaded), "strict=False must still load the SE blocks"
    meta = json.loads((se_only / CONFIG_NAME).read_text())
    assert len(meta["base_fingerprint"]) == 64


def test_a_save_interrupted_between_its_two_files_leaves_a_pair_load_refuses(tuned, base, tmp_path, monkeypatch):
    """New weights beside the old config (the config's write never happened): the config's class names and
    base-model checks describe other weights, so the pair must not load as if it were one adapter."""
    from se_retrofit import adapter

    folder = save_adapter(tuned, tmp_path / "adapter", base_model="resnet10t", extra_modules=("fc",),
                          class_names=[str(i) for i in range(10)])
    retrained = copy.deepcopy(tuned)
    randomise(retrained.layer1[0].se, seed=7)
    write = adapter._atomic_write

    def interrupted(path, *args, **kwargs):
        if path.name == CONFIG_NAME:
            raise KeyboardInterrupt  # stopped between the two renames
        return write(path, *args, **kwargs)

    monkeypatch.setattr(adapter, "_atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(retrained, folder, base_model="resnet10t", extra_modules=("fc",),
                     class_names=[chr(97 + i) for i in range(10)])
    monkeypatch.setattr(adapter, "_atomic_write", write)
    with pytest.raises(ValueError, match="holds other weights than the ones .* was saved with"):
        load(folder, base, example_input=SMALL)
    with pytest.warns(UserWarning, match="holds other weights"):
        load(folder, base, strict=False, example_input=SMALL)


def test_the_same_weights_saved_again_still_load(saved, base):
    """The check is on the tensors, not the file's bytes (a safetensors header's order is not fixed)."""
    from safetensors.torch import load_file, save_file

    _, with_head = saved
    tensors = load_file(str(with_head / WEIGHTS_NAME))
    save_file(tensors, str(with_head / WEIGHTS_NAME))  # same tensors, no metadata: other bytes
    load(with_head, base, example_input=SMALL)


def test_a_base_tensor_in_the_adapter_file_is_never_loaded(saved, base, tuned, tmp_path):
    """A base weight outside the SE blocks and extra_modules (a hand-edited file, or a save that wrote one) was
    loaded silently over the base's, the weights digest agreeing: the model ran with a changed backbone."""
    import shutil

    from safetensors.torch import load_file, save_file

    from se_retrofit.adapter import _digest

    _, with_head = saved
    folder = shutil.copytree(with_head, tmp_path / "adapter")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["conv1.0.weight"] = torch.zeros_like(base.conv1[0].weight)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**meta, "weights_sha256": _digest(tensors)}))
    with pytest.raises(ValueError, match=r"holds base-model tensors outside its SE blocks and extra_modules "
                                         r"\(conv1.0.weight\).*extra_modules.*strict=False"):
        load(folder, base, example_input=SMALL)
    with pytest.warns(UserWarning, match=r"(?s)strict=False despite.*\(conv1.0.weight\)"):
        loaded = load(folder, base, strict=False, example_input=SMALL)
    assert torch.equal(loaded.conv1[0].weight, base.conv1[0].weight), "strict=False loaded a base weight"
    assert torch.equal(outputs(loaded), outputs(tuned)), "strict=False should still load the SE blocks and the head"


def test_a_head_swapped_for_other_parameter_names_is_named_at_save_and_load(tmp_path) -> None:
    """``model.fc = nn.Sequential(nn.Dropout(), nn.Linear())`` after apply changes the head's keys: compared only
    where a key existed before and after, it was not seen, save_adapter said nothing and load blamed the SE
    blocks ("learned other features"). Saving the module alone does not help there: the base needs the change."""
    def base() -> nn.Module:
        torch.manual_seed(0)
        return create_model("resnet10t", num_classes=10).eval()

    se_model = se_retrofit.apply(base())
    se_model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(se_model.fc.in_features, 3))
    with pytest.warns(UserWarning, match=r"changed since se_retrofit.apply \(fc\..*4 of them added or removed"):
        save_adapter(se_model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"the module\(s\) fc were replaced after se_retrofit.apply") as info:
        load(tmp_path / "adapter", base())
    assert "extra_modules=['fc']" in str(info.value) and "same change to the base" in str(info.value), str(info.value)
    changed = base()
    changed.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(changed.fc.in_features, 3))
    save_adapter(se_model, tmp_path / "with_head", extra_modules=["fc"])
    rebuilt = load(tmp_path / "with_head", changed).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), se_model.eval()(x)), "the advice given does not rebuild the model"
