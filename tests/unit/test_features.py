"""Feature capture by module name, automatic layer maps and projectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distil.errors import DistilError
from distil.models.classifier import SmallCNN
from distil.models.features import (
    align_features,
    auto_layer_map,
    build_projectors,
    capture_features,
    feature_shapes,
    find_blocks,
    last_k_layer_map,
    projector_key,
    shape_layer_map,
    uniform_layer_map,
)


def _cnn(channels: list[int]) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(1, 10, channels=channels)


def test_capture_records_named_outputs_and_removes_hooks() -> None:
    model = _cnn([4, 8])
    x = torch.randn(2, 1, 8, 8)
    with capture_features(model, ["stages.0", "stages.1"]) as feats:
        model(x)
    assert feats["stages.0"].shape == (2, 4, 4, 4) and feats["stages.1"].shape == (2, 8, 2, 2)
    assert feats["stages.1"].requires_grad  # student features keep their graph
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_removes_hooks_on_error_and_names_close_matches() -> None:
    model = _cnn([4, 8])
    with pytest.raises(RuntimeError), capture_features(model, ["stages.0"]):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(DistilError, match="stages.1"), capture_features(model, ["stages.1x"]):
        pass
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_takes_first_element_of_tuple_outputs() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)[0]
            return x

    net = Net()
    assert find_blocks(net) == ["layers.0", "layers.1"]
    with capture_features(net, ["layers.1"], detach=True) as feats:
        net(torch.ones(1, 3))
    assert torch.equal(feats["layers.1"], torch.full((1, 3), 4.0))


def test_find_blocks_picks_the_longest_container() -> None:
    assert find_blocks(_cnn([4, 8, 8])) == ["stages.0", "stages.1", "stages.2"]
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == ["0", "1"]
    assert find_blocks(_cnn([4]), container="stages") == ["stages.0"]
    with pytest.raises(DistilError):
        find_blocks(nn.Linear(2, 2))


def test_uniform_and_last_k_maps() -> None:
    teacher = [f"t{i}" for i in range(6)]
    assert uniform_layer_map(["s0", "s1", "s2"], teacher) == [
        ("s0", "t1"),
        ("s1", "t3"),
        ("s2", "t5"),
    ]
    assert uniform_layer_map(["s0", "s1"], teacher) == [("s0", "t2"), ("s1", "t5")]
    assert uniform_layer_map(["s0"], teacher) == [("s0", "t5")]
    assert last_k_layer_map(["s0", "s1", "s2"], teacher, 2) == [("s1", "t4"), ("s2", "t5")]
    with pytest.raises(DistilError):
        last_k_layer_map(["s0"], teacher, 2)


def test_shape_map_pairs_equal_resolutions_in_depth_order() -> None:
    teacher, student = _cnn([8, 8, 16, 16]), _cnn([2, 4])
    teacher.stages[0][-1] = nn.Identity()  # stage 0 keeps 8x8, then three halvings: 8, 4, 2, 1
    x = torch.randn(2, 1, 8, 8)
    t_shapes = feature_shapes(teacher, find_blocks(teacher), lambda: teacher(x))
    s_shapes = feature_shapes(student, find_blocks(student), lambda: student(x))
    pairs = shape_layer_map(s_shapes, t_shapes)
    assert pairs == [("stages.0", "stages.1"), ("stages.1", "stages.2")]
    assert auto_layer_map("shape", s_shapes, t_shapes) == pairs
    assert auto_layer_map("uniform", s_shapes, t_shapes) == [
        ("stages.0", "stages.1"),
        ("stages.1", "stages.3"),
    ]


def test_projectors_follow_widths_and_train() -> None:
    teacher, student = _cnn([8, 16]), _cnn([2, 16])
    x = torch.randn(3, 1, 8, 8)
    t_shapes = feature_shapes(teacher, find_blocks(teacher), lambda: teacher(x))
    s_shapes = feature_shapes(student, find_blocks(student), lambda: student(x))
    pairs = [("stages.0", "stages.0"), ("stages.1", "stages.1")]
    projectors = build_projectors(pairs, s_shapes, t_shapes)
    assert isinstance(projectors[projector_key(pairs[0])], nn.Conv2d)
    assert isinstance(projectors[projector_key(pairs[1])], nn.Identity)
    seq = build_projectors([("a", "b")], {"a": torch.Size([2, 5, 4])}, {"b": torch.Size([2, 5, 6])})
    assert isinstance(seq[projector_key(("a", "b"))], nn.Linear)
    # the projector gets gradients through a feature loss
    with torch.no_grad(), capture_features(teacher, ["stages.0"], detach=True) as t_feats:
        teacher(x)
    with capture_features(student, ["stages.0"]) as s_feats:
        student(x)
    s, t = align_features(
        s_feats["stages.0"], t_feats["stages.0"], projectors[projector_key(pairs[0])]
    )
    assert s.shape == t.shape
    (s - t).square().mean().backward()
    assert projectors[projector_key(pairs[0])].weight.grad is not None


def test_align_pools_the_larger_map() -> None:
    s, t = align_features(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4))
    assert s.shape == t.shape == (2, 3, 4, 4)
    s, t = align_features(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 4))
    assert s.shape == t.shape == (2, 3, 2, 2)
