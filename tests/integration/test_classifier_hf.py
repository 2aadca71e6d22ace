"""classifier_kd with Hugging Face model folders: a tiny BERT text teacher and a tiny ViT image
teacher, each built in code, saved with save_pretrained and loaded back by the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import transformers
from typer.testing import CliRunner

from distil.cli import app
from tests.helpers import word_level_tokenizer

runner = CliRunner()
WORDS_POS = ["good", "great", "fine", "lovely", "superb", "fun"]
WORDS_NEG = ["bad", "awful", "dull", "boring", "poor", "sad"]


def _text_data(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(160):
        pos = i % 2 == 0
        words = WORDS_POS if pos else WORDS_NEG
        picks = torch.randint(0, len(words), (4,), generator=g).tolist()
        rows.append(
            {
                "text": "the film was " + " ".join(words[p] for p in picks),
                "label": "pos" if pos else "neg",
            }
        )
    path = tmp_path / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _bert_folder(tmp_path: Path, texts: list[str]) -> Path:
    fast = word_level_tokenizer(texts)
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=160,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_hf_text_teacher_into_zoo_student(tmp_path: Path) -> None:
    data = _text_data(tmp_path)
    folder = _bert_folder(tmp_path, pd.read_csv(data)["text"].tolist())
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            "classifier_kd",
            f"data.source={{train: [{data}]}}",
            "data.text_column=text",
            f"teacher.model.hf={folder}",
            "teacher.model.zoo=null",
            "teacher.model.kwargs={}",
            "teacher.train=true",
            "teacher.training.epochs=8",
            "teacher.training.batch_size=16",
            "student.model.kwargs={hidden: [8], text_features: 256}",
            "train.epochs=4",
            "train.batch_size=16",
            "run.log_with=[]",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = {
        r["model"]: r for r in json.loads((run_dir / "report.json").read_text())["table"]["rows"]
    }
    assert rows["teacher"]["source"].startswith("hf:")
    assert rows["teacher"]["accuracy"] > 0.9  # the words decide the label: a trained BERT gets it
    # the trained HF teacher is saved as a folder transformers loads back
    again = transformers.AutoModelForSequenceClassification.from_pretrained(
        run_dir / "teacher" / "final"
    )
    assert again.config.num_labels == 2


def test_hf_image_teacher_with_wrong_head_is_refused(tmp_path: Path) -> None:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            "classifier_kd",
            "data.source={builtin: digits}",
            f"teacher.model.hf={folder}",
            "teacher.model.zoo=null",
            "teacher.model.kwargs={}",
            "teacher.training.epochs=1",
            "train.epochs=1",
            "eval.baseline=false",
            "run.log_with=[]",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = {
        r["model"]: r for r in json.loads((run_dir / "report.json").read_text())["table"]["rows"]
    }
    assert rows["teacher"]["source"].startswith("hf:")
    config.num_labels = 4
    bad = tmp_path / "vit4"
    transformers.ViTForImageClassification(config).save_pretrained(bad)
    result = runner.invoke(
        app,
        [
            "run",
            "classifier_kd",
            "data.source={builtin: digits}",
            f"teacher.model.hf={bad}",
            "teacher.model.zoo=null",
            "teacher.model.kwargs={}",
            "--run-dir",
            str(tmp_path / "run2"),
        ],
    )
    assert result.exit_code == 2
    assert "the model has 4 output classes but the dataset 'digits' has 10" in result.output
