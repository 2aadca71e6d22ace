"""The pipeline on each model kind, ending in folders other tools load as they are: a causal LM
(width + depth pruning, int8) that plain ``from_pretrained`` loads, a sentence encoder (layers +
width) that sentence-transformers loads with a checked ONNX file, and a CNN quantised to static
int8 whose ``.pt2`` runs without distil."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from distil.compress.artifacts import LoadedModel
from distil.compress.config import Calibration, ModelKind, PipelineConfig
from distil.compress.export import save_zoo_classifier
from distil.compress.pipeline import PipelineHooks, StageStatus, run_pipeline
from distil.models.classifier import SmallCNN
from distil.models.encoder import encode, load_encoder, save_sentence_encoder
from tests.helpers import make_lm_fixture, word_level_tokenizer


def _pipeline(source: Path, kind: str, out: Path, *stages: dict[str, object]) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": kind, "folder": str(source)},
            "output_dir": str(out),
            "stages": list(stages),
            "measure": {"batch_sizes": [1, 2], "compiled": [False], "repeats": 2, "warmup": 1},
        }
    )


def test_causal_lm_pruned_and_int8_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    fixture = make_lm_fixture(tmp_path)
    vocab = transformers.AutoConfig.from_pretrained(fixture["teacher"]).vocab_size
    ids = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))

    def calibration(kind: ModelKind, options: Calibration) -> list[dict[str, torch.Tensor]]:
        assert kind == ModelKind.causal_lm
        return [{"input_ids": ids[i : i + 4]} for i in range(0, len(ids), 4)]

    def mean_nll(loaded: LoadedModel) -> dict[str, float]:
        with torch.no_grad():
            out = loaded.module(input_ids=ids, labels=ids)
        return {"nll": float(out.loss)}

    config = _pipeline(
        fixture["teacher"],
        "causal_lm",
        tmp_path / "out",
        {
            "stage": "prune",
            "method": {"num_layers": 3, "hidden_size": 24, "intermediate_size": 48, "num_heads": 2},
        },
        {"stage": "quantise", "scheme": "int8_weight_only"},
        {"stage": "export"},
    )
    report = run_pipeline(config, PipelineHooks(calibration=calibration, evaluate=mean_nll))
    prune = report.stage("prune")
    assert prune.details["shape"] == {
        "num_layers": 3,
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_heads": 2,
        "num_kv_heads": 2,
    }
    assert prune.metrics["parameters"] < report.source["metrics"]["parameters"]
    quantise = report.stage("quantise")
    assert quantise.metrics["weight_bytes"] < prune.metrics["weight_bytes"]
    nll_fp, nll_int8 = prune.metrics["quality"]["nll"], quantise.metrics["quality"]["nll"]
    assert abs(nll_int8 - nll_fp) < 0.01 * nll_fp
    assert {(r["batch_size"], r["compiled"]) for r in quantise.metrics["latency"]} == {
        (1, False),
        (2, False),
    }
    final = report.final_model_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    assert model.config.num_hidden_layers == 3 and len(tokenizer) > 0
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(nll_int8, rel=1e-5)


def _encoder_source(tmp_path: Path) -> Path:
    words = ("the", "a", "film", "plot", "was", "is", "good", "dull", "long", "short", "and")
    g = torch.Generator().manual_seed(0)
    sentences = [
        " ".join(words[i] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(40)
    ]
    fast = word_level_tokenizer(sentences)
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    raw = tmp_path / "raw"
    transformers.BertModel(config).save_pretrained(raw)
    fast.save_pretrained(raw)
    encoder = load_encoder(raw, max_length=16, normalize=True)
    save_sentence_encoder(encoder, tmp_path / "encoder")
    (tmp_path / "sentences.txt").write_text("\n".join(sentences))
    return tmp_path / "encoder"


def test_encoder_pruned_exports_for_sentence_transformers_and_onnx(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    source = _encoder_source(tmp_path)
    sentences = (tmp_path / "sentences.txt").read_text().splitlines()
    config = _pipeline(
        source,
        "encoder",
        tmp_path / "out",
        {"stage": "prune", "method": {"kind": "encoder_width", "layers": [0, 2], "hidden_size": 8}},
        {"stage": "export", "onnx": True},
    )
    hooks = PipelineHooks(calibration=lambda kind, options: sentences[:20])
    report = run_pipeline(config, hooks)
    export = report.stage("export")
    assert export.details["onnx_max_abs_diff"] < 1e-4 and export.details["onnx_check_batch"] == 5
    assert (export.folder / "extras" / "model.onnx").is_file()
    final = report.final_model_dir
    theirs = SentenceTransformer(str(final), device="cpu").encode(sentences[:4])
    ours = encode(load_encoder(final), sentences[:4])
    assert theirs.shape == (4, 8)
    np.testing.assert_allclose(theirs, ours.numpy(), rtol=1e-4, atol=1e-5)
    again = run_pipeline(config, hooks)
    assert all(r.status == StageStatus.reused for r in again.stages)


def test_cnn_static_int8_pt2_runs_without_distil(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_zoo_classifier(
        SmallCNN(1, 4, channels=(16, 32)),
        tmp_path / "cnn",
        zoo="cnn",
        kwargs={"channels": [16, 32]},
        in_shape=(1, 12, 12),
        num_classes=4,
    )
    images = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    config = _pipeline(
        tmp_path / "cnn",
        "classifier",
        tmp_path / "out",
        {"stage": "prune", "method": {"kind": "cnn_channels", "ratio": 0.25}},
        {"stage": "quantise", "method": "static_pt2e"},
    )
    report = run_pipeline(config, PipelineHooks(calibration=lambda kind, options: [images]))
    quantise = report.stage("quantise")
    assert quantise.details["method"] == "static_pt2e"
    program = torch.export.load(str(quantise.model_dir / "model.pt2")).module()
    pruned = report.stage("prune")
    from distil.compress.export import load_zoo_classifier

    float_model = load_zoo_classifier(pruned.model_dir)
    with torch.no_grad():
        reference, out = float_model(images), program(images)
    assert float((out - reference).abs().max()) < 0.1 * float(reference.abs().max()) + 1e-3
