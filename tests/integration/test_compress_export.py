"""Export: a pruned zoo CNN folder that rebuilds without pickle, ONNX of a CNN and of a narrowed
sentence encoder checked with onnxruntime, and the encoder folder sentence-transformers loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from distil.compress.cnn_prune import prune_small_cnn_channels, zoo_kwargs_of
from distil.compress.encoder import narrow_encoder
from distil.compress.export import (
    SentenceEmbedding,
    check_onnx,
    export_onnx,
    load_zoo_classifier,
    read_zoo_spec,
    save_zoo_classifier,
)
from distil.errors import DistilError
from distil.models.classifier import SmallCNN
from distil.models.encoder import encode, load_encoder, save_sentence_encoder, tokenize

WORDS = ("the", "a", "film", "plot", "cast", "was", "is", "good", "dull", "long", "short", "dark")


def _sentences(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(3 + k % 5),), generator=g))
        for k in range(n)
    ]


def _encoder_folder(tmp_path: Path) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        _sentences(50),
        trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]),
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    folder = tmp_path / "encoder"
    transformers.BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_pruned_cnn_folder_and_onnx_agree_with_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(1, 10, channels=(8, 16)).eval()
    pruned = prune_small_cnn_channels(cnn, ratio=0.5).model
    kwargs = zoo_kwargs_of("cnn", pruned, {"channels": [8, 16]})
    save_zoo_classifier(
        pruned, tmp_path / "cnn", zoo="cnn", kwargs=kwargs, in_shape=(1, 12, 12), num_classes=10
    )
    assert read_zoo_spec(tmp_path / "cnn")["kwargs"]["channels"] == [4, 8]
    rebuilt = load_zoo_classifier(tmp_path / "cnn")
    images = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), pruned(images))
    onnx_path = export_onnx(
        rebuilt, {"x": images[:2]}, tmp_path / "cnn.onnx", output_names=["logits"]
    )
    check = check_onnx(onnx_path, rebuilt, {"x": images})  # another batch size: the axis is dynamic
    assert check.batch_size == 5 and check.max_abs_diff < 1e-4
    with torch.no_grad():  # a different model must fail the check
        rebuilt.head.bias += 1.0
    with pytest.raises(DistilError, match="differ from PyTorch"):
        check_onnx(onnx_path, rebuilt, {"x": images})
    with pytest.raises(DistilError, match="distil_model.json"):
        load_zoo_classifier(tmp_path)


def test_narrowed_encoder_exports_for_both_loaders_and_onnx(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    teacher = load_encoder(_encoder_folder(tmp_path), max_length=16, normalize=True)
    sentences = _sentences(12)
    narrow = narrow_encoder(teacher, 8, calibration=sentences)
    narrow.model.eval()
    save_sentence_encoder(narrow, tmp_path / "student")
    ours = encode(narrow, sentences[:6])
    theirs = SentenceTransformer(str(tmp_path / "student"), device="cpu").encode(
        sentences[:6], convert_to_numpy=True
    )
    np.testing.assert_allclose(theirs, ours.numpy(), rtol=1e-4, atol=1e-5)
    graph = SentenceEmbedding(narrow.model, normalize=True)
    small = tokenize(narrow, sentences[:2])
    onnx_path = export_onnx(
        graph,
        {"input_ids": small["input_ids"], "attention_mask": small["attention_mask"]},
        tmp_path / "encoder.onnx",
        output_names=["sentence_embedding"],
        dynamic_dims={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
        },
    )
    batch = tokenize(narrow, sentences[:6])  # more sentences, another padded length
    check = check_onnx(
        onnx_path,
        graph,
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
    )
    assert check.batch_size == 6 and check.max_abs_diff < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(
            graph(batch["input_ids"], batch["attention_mask"]), ours, rtol=1e-5, atol=1e-6
        )
