"""CNN channel pruning: own slicing equals masking, criteria rank dead channels last, DepGraph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distil.compress.cnn_prune import (
    ChannelImportance,
    channels_after,
    prune_small_cnn_channels,
    prune_with_depgraph,
    small_cnn_channel_scores,
    zoo_kwargs_of,
)
from distil.errors import DistilError
from distil.models.classifier import SmallCNN, SmallResNet


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(1, 10, channels=(8, 12, 16))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("importance", list(ChannelImportance))
def test_pruning_equals_zeroing_what_reads_the_removed_channels(
    importance: ChannelImportance,
) -> None:
    model = _cnn()
    result = prune_small_cnn_channels(
        model, ratio=0.5, importance=importance, calibration=[_images()]
    )
    assert result.channels == [4, 6, 8]
    assert result.kept is not None
    masked = _cnn()
    consumers = [masked.stages[1][0], masked.stages[2][0], masked.head]
    with torch.no_grad():
        for keep, consumer in zip(result.kept, consumers, strict=True):
            drop = torch.ones(consumer.weight.shape[1], dtype=torch.bool)
            drop[keep] = False
            consumer.weight[:, drop] = 0
        x = _images()
        torch.testing.assert_close(result.model(x), masked(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in result.model.parameters()) < sum(
        p.numel() for p in model.parameters()
    )


def test_each_criterion_ranks_a_dead_channel_last() -> None:
    model = _cnn()
    with torch.no_grad():
        bn = model.stages[1][1]
        bn.weight[3] = 0.0  # channel 3 of stage 1 outputs relu(0 * x + beta)
        bn.bias[3] = -1.0  # which is 0 everywhere
        model.stages[1][0].weight[3] = 0.0
    for importance in ChannelImportance:
        scores = small_cnn_channel_scores(model, importance, [_images()])
        assert float(scores[1][3]) == 0.0
        result = prune_small_cnn_channels(
            model, channels=[8, 11, 16], importance=importance, calibration=[_images()]
        )
        assert result.kept is not None and 3 not in result.kept[1].tolist()


def test_bad_requests_are_named() -> None:
    model = _cnn()
    with pytest.raises(DistilError, match="exactly one"):
        prune_small_cnn_channels(model)
    with pytest.raises(DistilError, match="between 1 and its"):
        prune_small_cnn_channels(model, channels=[8, 13, 16])
    with pytest.raises(DistilError, match="calibration"):
        small_cnn_channel_scores(model, ChannelImportance.activation)
    with pytest.raises(DistilError, match="ratio"):
        channels_after([8], ratio=1.0)
    assert channels_after([8, 3], ratio=0.75) == [2, 1]


def test_depgraph_prunes_a_resnet_that_the_zoo_can_rebuild() -> None:
    torch.manual_seed(0)
    model = SmallResNet(1, 10, widths=(8, 16, 16)).eval()
    x = _images()
    pruned = prune_with_depgraph(model, x[:1], ratio=0.5)
    kwargs = zoo_kwargs_of("resnet", pruned, {"widths": [8, 16, 16]})
    assert kwargs["widths"] == [4, 8, 8]
    rebuilt = SmallResNet(1, 10, **kwargs).eval()
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))
        assert pruned(x).shape == (4, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in SmallResNet(1, 10, widths=(8, 16, 16)).parameters()
    )  # the original is untouched


def test_depgraph_and_zoo_kwargs_on_the_small_cnn() -> None:
    model = _cnn()
    pruned = prune_with_depgraph(
        model, _images(1), ratio=0.5, importance=ChannelImportance.bn_scale
    )
    assert zoo_kwargs_of("cnn", pruned, {"channels": [8, 12, 16], "pool_every": 1}) == {
        "channels": [4, 6, 8],
        "pool_every": 1,
    }
    with pytest.raises(DistilError, match="weight_l2 or bn_scale"):
        prune_with_depgraph(model, _images(1), ratio=0.5, importance=ChannelImportance.activation)
