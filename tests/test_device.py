"""One device grammar (patchctl.patches.device) behind merging, in-memory composing and evaluating."""

from __future__ import annotations

import pytest
import torch

from patchctl.errors import DeviceUnavailable, InvalidArgument
from patchctl.evals.runtime import pick_device
from patchctl.patches.device import problem, resolve
from patchctl.registry.ops.compose import resolve_device
from patchctl.registry.ops.merging import MergeSpec

BAD = ["gpu", "cuda:x", "CUDA", "", "cuda:-1", "tpu", "cuda:1:2", " cpu"]


@pytest.mark.parametrize("name", BAD)
def test_every_surface_refuses_the_same_bad_device_names_with_one_message(name):
    want = f"unknown device {name!r}: choose cpu, cuda, cuda:N or auto"
    assert problem(name) == want
    for surface in (resolve, pick_device, resolve_device):
        with pytest.raises(InvalidArgument) as e:
            surface(name)
        assert str(e.value) == want, surface
    assert (InvalidArgument, want) in MergeSpec(device=name).problems()


@pytest.mark.parametrize("name", ["cpu", "auto", None])
def test_cpu_auto_and_none_resolve_alike_everywhere(name):
    want = "cuda" if name != "cpu" and torch.cuda.is_available() else "cpu"
    assert resolve(name) == pick_device(name) == str(resolve_device(name)) == want
    if name is not None:
        assert not MergeSpec(device=name).problems()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_an_absent_gpu_is_device_unavailable_everywhere_naming_the_remedy(name):
    for surface, remedy in ((resolve, "use --device cpu"), (pick_device, "use --device cpu, or leave the device out"),
                            (resolve_device, "use device='cpu'")):
        with pytest.raises(DeviceUnavailable) as e:
            surface(name)
        assert f"device {name!r} was asked for but no CUDA device is present; {remedy}" in str(e.value)


# -- one tensor-name rule (patchctl.registry.formats.checkpoint.resolve_name) ------------------
from patchctl.registry.formats.checkpoint import resolve_name  # noqa: E402

NAMES = ["bert.encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.weight",
         "a.x.weight", "b.x.weight", "x.weight.extra", "pooler.dense.weight"]


@pytest.mark.parametrize(("target", "want"), [
    ("pooler.dense.weight", "pooler.dense.weight"),                             # exact
    ("encoder.layer.0.attention.self.query.weight",
     "bert.encoder.layer.0.attention.self.query.weight"),                       # the one *.target
    ("base_model.model.encoder.layer.0.output.dense.weight",
     "encoder.layer.0.output.dense.weight"),                                    # leading components cut
    ("x.weight", None),                                                         # a.x and b.x: ambiguous
    ("model.x.weight", None),                                                   # ambiguous after the cut too
    ("nope.weight", None),
])
def test_one_name_rule_decides_the_ambiguous_case_by_refusing(target, want):
    assert resolve_name(target, NAMES) == want


def test_the_composer_and_the_checkpoint_use_the_same_rule(tmp_path):
    from safetensors.torch import save_file

    from patchctl.registry.formats.checkpoint import Checkpoint
    from patchctl.registry.ops.compose.plan import ModuleTensors

    tensors = {n: torch.zeros(1) for n in NAMES}
    save_file(tensors, tmp_path / "model.safetensors")
    ck = Checkpoint(tmp_path)
    module = torch.nn.Module()
    for i, n in enumerate(NAMES):
        parent = module
        *path, leaf = n.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_buffer(leaf, torch.zeros(1) + i)
    mt = ModuleTensors(module)
    for target in ["pooler.dense.weight", "x.weight", "model.x.weight", "encoder.layer.0.attention.self.query.weight",
                   "base_model.model.encoder.layer.0.output.dense.weight"]:
        assert ck.resolve(target) == mt.resolve(target) == resolve_name(target, NAMES)
