"""Per-example caches (classifier logits, embeddings): exact lookup by id, resume, integrity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distil.cache.examples import ExampleCache, write_example_cache
from distil.cache.integrity import CacheIntegrityError
from distil.cache.manifest import read_manifest, teacher_fingerprint
from distil.errors import DistilError


class TwoHeads(nn.Module):
    """A frozen toy teacher: class logits and an L2-normalised embedding per example."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))  # (b, 16)
        return {"logits": self.head(h), "embedding": nn.functional.normalize(h, dim=-1)}


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[TwoHeads, torch.Tensor, list[int], dict[str, object]]:
    teacher = TwoHeads().eval()
    inputs = torch.randn(50, 12, generator=torch.Generator().manual_seed(1))  # (N, 12)
    ids = [1000 + 3 * i for i in range(50)]
    spec: dict[str, object] = {
        "teacher_fingerprint": teacher_fingerprint(teacher),
        "dataset_fingerprint": "toy-v1",
    }
    return teacher, inputs, ids, spec


def test_classifier_and_embedding_outputs_round_trip_by_id(setup: tuple, tmp_path: Path) -> None:
    teacher, inputs, ids, spec = setup
    out = tmp_path / "c"
    manifest = write_example_cache(
        out,
        example_ids=ids,
        compute=lambda idx: teacher(inputs[idx]),
        spec=spec,
        dtypes={"logits": torch.float16},
        examples_per_shard=16,
        batch_size=5,
    )
    assert manifest["tensors"] == {
        "embedding": {"dtype": "float32", "shape": [16]},
        "logits": {"dtype": "float16", "shape": [5]},
    }
    assert len(manifest["shards"]) == 4 and manifest["num_examples"] == 50
    cache = ExampleCache(out, expect={"dataset_fingerprint": "toy-v1"}, max_loaded_shards=1)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(2))
    got = cache.get([ids[i] for i in order.tolist()])
    with torch.no_grad():
        want = teacher(inputs[order])
    # fp32 as computed (batch composition differs, so matmul rounding may too)
    torch.testing.assert_close(got["embedding"], want["embedding"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["logits"].float(), want["logits"], rtol=1e-3, atol=1e-3)
    with pytest.raises(DistilError, match="dataset_fingerprint"):
        ExampleCache(out, expect={"dataset_fingerprint": "toy-v2"})
    with pytest.raises(DistilError, match="not in the cache"):
        cache.get([1])


def test_resume_rewrites_only_missing_shards_byte_identically(setup: tuple, tmp_path: Path) -> None:
    teacher, inputs, ids, spec = setup
    calls: list[list[int]] = []

    def compute(idx: list[int]) -> dict[str, torch.Tensor]:
        calls.append(idx)
        return teacher(inputs[idx])

    out = tmp_path / "r"
    kw = {
        "example_ids": ids,
        "compute": compute,
        "spec": spec,
        "examples_per_shard": 16,
        "batch_size": 8,
    }
    write_example_cache(out, **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ("shard-00002.safetensors", "shard-00002.json", "manifest.json"):
        (out / name).unlink()
    calls.clear()
    write_example_cache(out, **kw)
    assert calls == [list(range(32, 40)), list(range(40, 48))]  # shard 2 only
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(DistilError, match="examples_per_shard"):
        write_example_cache(out, **{**kw, "examples_per_shard": 10})
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CacheIntegrityError, match="shard-00001.safetensors"):
        ExampleCache(out)
    assert read_manifest(out)["kind"] == "examples"


def test_inspect_summarises_a_per_example_cache(setup: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from distil.cli import app

    teacher, inputs, ids, spec = setup
    write_example_cache(
        tmp_path / "i", example_ids=ids, compute=lambda idx: teacher(inputs[idx]), spec=spec
    )
    shown = CliRunner().invoke(app, ["cache", "inspect", str(tmp_path / "i"), "--verify"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert (
        "bytes per example" in text
        and "logits=float32[5]" in text
        and "every shard matches" in text
    )
