"""Hugging Face text classifiers: the configurable token length of ``hf:`` models, and hidden-state
KD between BERT blocks (what a ``BertLayer`` hook captures, and the hint over real tokens only).

Every model is a tiny BERT built in code with a word-level tokenizer; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from distil.config.sources import HFModel
from distil.data.classification import ClassificationData, Split
from distil.errors import DistilError
from distil.losses.representation import hint_loss
from distil.models.classifier import HF_TEXT_MAX_LENGTH, build_classifier, logits_of
from distil.models.features import (
    ATTENTION_MASK,
    FeatureTerm,
    capture_features,
    feature_distiller,
    feature_shapes,
    masked_token_hint,
)

TEXTS = [
    "a good film",
    "a bad and dull film",
    "great fun",
    "the plot was boring and the cast was sad",
]


def _data(texts: list[str] = TEXTS) -> ClassificationData:
    split = Split(labels=np.arange(len(texts), dtype=np.int64) % 2, texts=list(texts))
    return ClassificationData("tiny", split, split, ["neg", "pos"], "text")


def _bert_folder(tmp_path: Path, name: str, layers: int, positions: int = 64) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
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
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=positions,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(layers)
    folder = tmp_path / name
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bert")
    return _bert_folder(root, "teacher", layers=2), _bert_folder(root, "student", layers=1)


def test_max_length_defaults_to_128_and_is_configurable(tmp_path: Path) -> None:
    folder = _bert_folder(tmp_path, "long", layers=1, positions=160)
    data = _data()
    default = build_classifier(HFModel(hf=str(folder), kwargs={}), data)
    assert default.encoder(data.train)["input_ids"].shape == (4, HF_TEXT_MAX_LENGTH) == (4, 128)
    short = build_classifier(HFModel(hf=str(folder), kwargs={"max_length": 5}), data)
    enc = short.encoder(data.train)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (4, 5)
    assert enc["attention_mask"][3].all()  # the long snippet is truncated to 5 tokens
    assert not enc["attention_mask"][2].all()  # "great fun" is padded
    assert "5 tokens" in short.encoder.description
    assert logits_of(short.module.eval(), enc).shape == (4, 2)


@pytest.mark.parametrize("bad", [0, 1, -3, "64", 6.0, True])
def test_bad_max_length_is_refused(folders: tuple[Path, Path], bad: object) -> None:
    with pytest.raises(DistilError, match="max_length must be an integer"):
        build_classifier(HFModel(hf=str(folders[1]), kwargs={"max_length": bad}), _data())


def test_max_length_beyond_the_position_table_is_refused(folders: tuple[Path, Path]) -> None:
    with pytest.raises(DistilError, match="longer than the model's 64 positions"):
        build_classifier(HFModel(hf=str(folders[1]), kwargs={"max_length": 65}), _data())


def test_max_length_on_image_data_is_refused(folders: tuple[Path, Path]) -> None:
    split = Split(
        labels=np.zeros(2, dtype=np.int64), images=np.zeros((2, 1, 8, 8), dtype=np.float32)
    )
    data = ClassificationData("img", split, split, ["a", "b"], "image")
    with pytest.raises(DistilError, match="text models only"):
        build_classifier(HFModel(hf=str(folders[1]), kwargs={"max_length": 8}), data)


def test_other_kwargs_are_ignored_with_a_warning(
    folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    built = build_classifier(
        HFModel(hf=str(folders[1]), kwargs={"hidden": [32], "max_length": 8}),
        _data(),
    )
    assert built.encoder(_data().train)["input_ids"].shape == (4, 8)
    assert "ignoring kwargs ['hidden']" in caplog.text


def test_bert_layer_capture_gives_token_features_and_the_attention_mask(
    folders: tuple[Path, Path],
) -> None:
    built = build_classifier(HFModel(hf=str(folders[0]), kwargs={"max_length": 8}), _data())
    enc = built.encoder(_data().train)
    with capture_features(built.module, ["bert.encoder.layer.1"]) as feats:
        out = built.module(**enc, output_hidden_states=True)
    assert feats["bert.encoder.layer.1"].shape == (4, 8, 16)  # a BertLayer returns (B, L, H)
    torch.testing.assert_close(feats["bert.encoder.layer.1"], out.hidden_states[2])
    assert torch.equal(feats[ATTENTION_MASK], enc["attention_mask"])
    with capture_features(built.module, []) as none:  # no names: no hooks, no mask
        built.module(**enc)
    assert none == {}


def test_masked_token_hint_ignores_padding_and_averages_per_example() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    value = masked_token_hint(s, t, mask, num_items=2)
    expected = ((s[0, :3] - t[0, :3]).square().mean() + (s[1] - t[1]).square().mean()) / 2
    torch.testing.assert_close(value, expected)
    t_changed = t.clone()
    t_changed[0, 3:] += 100.0  # the teacher's padded positions do not matter
    torch.testing.assert_close(masked_token_hint(s, t_changed, mask, num_items=2), value)
    value.backward()
    assert s.grad is not None and torch.all(s.grad[0, 3:] == 0) and torch.all(s.grad[0, :3] != 0)
    # all-ones mask: the same as the unmasked per-example hint
    ones = torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(
        masked_token_hint(s, t, ones, 2), hint_loss(s, t, feature_dims=2, num_items=2)
    )


def test_feature_distiller_between_bert_blocks_masks_padding(folders: tuple[Path, Path]) -> None:
    data = _data()
    teacher = build_classifier(HFModel(hf=str(folders[0]), kwargs={"max_length": 8}), data)
    student = build_classifier(HFModel(hf=str(folders[1]), kwargs={"max_length": 8}), data)
    enc = student.encoder(data.train)
    term = FeatureTerm(
        student="bert.encoder.layer.0", teacher="bert.encoder.layer.1", loss="hint", weight=1.0
    )
    t_shapes = feature_shapes(
        teacher.module,
        [term.teacher],
        lambda: logits_of(teacher.module, {k: v[:2] for k, v in enc.items()}),
    )
    fkd = feature_distiller(
        [term],
        student.module,
        lambda: logits_of(student.module, {k: v[:2] for k, v in enc.items()}),
        t_shapes,
    )
    assert isinstance(
        fkd.projectors["bert_encoder_layer_0->bert_encoder_layer_1"], torch.nn.Identity
    )  # equal widths
    with capture_features(student.module, fkd.student_names) as s_feats:
        logits_of(student.module, enc)
    with (
        torch.no_grad(),
        capture_features(teacher.module, fkd.teacher_names, detach=True) as t_feats,
    ):
        logits_of(teacher.module, enc)
    value = fkd.terms(s_feats, t_feats, num_items=4)[term.name].loss
    s_h, t_h = s_feats[term.student], t_feats[term.teacher]
    torch.testing.assert_close(value, masked_token_hint(s_h, t_h, enc["attention_mask"], 4))
    unmasked = hint_loss(s_h, t_h, feature_dims=2, num_items=4)
    assert not torch.allclose(value, unmasked)  # the padded positions were left out
    # a zoo-style model (no attention_mask keyword): the plain hint, as before
    no_mask = {k: v for k, v in s_feats.items() if k != ATTENTION_MASK}
    torch.testing.assert_close(fkd.terms(no_mask, t_feats, num_items=4)[term.name].loss, unmasked)


def test_image_inputs_get_canonical_strides_whatever_numpy_gave() -> None:
    """A subset and a new-axis array of the same images encode to identically laid-out tensors."""
    import numpy as np

    from distil.data.classification import Split
    from distil.models.classifier import _image_tensor

    base = np.random.default_rng(0).random((6, 28, 28), dtype=np.float32)
    new_axis = Split(np.zeros(6, dtype=np.int64), images=base[:, None])  # channel stride 0
    subset = Split(
        np.zeros(6, dtype=np.int64), images=base[:, None][np.arange(6)]
    )  # channel stride 1
    a, b = _image_tensor(new_axis)["x"], _image_tensor(subset)["x"]
    assert a.stride() == b.stride() == (784, 784, 28, 1)
    assert torch.equal(a, b)
