"""Builders shared by several test modules: tiny tokenizers, models and data files made in
code from the built-in corpus (nothing is downloaded), and a CLI runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from distil.cli import app

runner = CliRunner()

CACHE_SPEC = {
    "num_layers": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_context": 64,
}


def write_fixture(root: Path) -> None:
    """A 260-id BPE tokenizer and a small text file from the built-in corpus."""
    from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts

    texts = [p.read_text(encoding="utf-8")[:1500] for p in sorted(stdlib_root().glob("*.py"))[:8]]
    train_bpe_tokenizer_from_texts(texts, root / "tok", 300)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def make_lm_fixture(root: Path) -> dict[str, Path]:
    """A tokenizer (400 ids, chat template), a 4-layer teacher with 8 padded vocab rows, and data files."""
    from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts
    from distil.models.lm import CausalLMSpec, build_causal_lm, save_model_folder
    from distil.models.vocab import load_tokenizer_folder

    texts = [p.read_text(encoding="utf-8")[:2500] for p in sorted(stdlib_root().glob("*.py"))[:14]]
    train_bpe_tokenizer_from_texts(texts, root / "tok", 400)
    tok = load_tokenizer_folder(root / "tok")
    spec = CausalLMSpec(
        num_layers=4,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        vocab_size=len(tok) + 8,
        max_context=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    save_model_folder(
        build_causal_lm(spec, seed=0), root / "teacher", tokenizer=tok, overwrite=True
    )
    lines = {
        "text.jsonl": [{"text": t} for t in texts[:10]],
        "pc.jsonl": [
            {"prompt": t[i : i + 24], "completion": t[i + 24 : i + 24 + 8 * (1 + i % 4)]}
            for i in range(0, 420, 10)
            for t in texts[:1]
        ],
        "chat.jsonl": [
            {
                "messages": [
                    {"role": "user", "content": t[:20]},
                    {"role": "assistant", "content": t[20:45]},
                ]
            }
            for t in texts * 3
        ],
        "user_only.jsonl": [{"messages": [{"role": "user", "content": t[:40]}]} for t in texts],
    }
    for name, rows in lines.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "tok": root / "tok",
        "teacher": root / "teacher",
        **{n.split(".")[0]: root / n for n in lines},
    }


def make_draft_pair(
    *, vocab_size: int = 400, padded_rows: int = 8, draft_layers: int = 1
) -> tuple[Any, Any]:
    """A tiny Llama target (4 layers x 32, ``vocab_size + padded_rows`` output rows, built in
    code, no files) and a draft made of ``draft_layers`` of its layers, both in float64 so that
    batched and one-row passes agree to the last bit on every argmax."""
    from distil.models.lm import CausalLMSpec, build_causal_lm, init_student_from_teacher

    spec = CausalLMSpec(
        num_layers=4,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        vocab_size=vocab_size + padded_rows,
        max_context=64,
        eos_token_id=1,
        pad_token_id=0,
    )
    target = build_causal_lm(spec, seed=0).double().eval()
    draft = init_student_from_teacher(target, num_layers=draft_layers).eval()
    return target, draft


def base_args(lm: dict[str, Path], data: str = "text") -> list[str]:
    return [
        "run",
        "lm_kd",
        f"teacher.model={{hf: {lm['teacher']}}}",
        f"data.source={{train: [{lm[data]}]}}",
        "data.max_length=64",
        "student.model={from_teacher: {num_layers: 2}}",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "run.log_with=[]",
        "eval.generation.prompts=1",
        "eval.generation.prompt_tokens=8",
        "eval.generation.max_new_tokens=6",
        "eval.generation.speed_new_tokens=4",
        "eval.generation.speed_batch=2",
        "data.eval_limit=8",
    ]


def run_cli(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    extra = str(result.exception) if result.exception and result.exit_code not in (0, 2) else ""
    return result.exit_code, result.output + extra


def free_port() -> int:
    """A TCP port nothing listens on now, for torchrun's rendezvous (a fixed port collides when
    two test runs overlap)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_diffusion_unet(num_classes: int = 3, seed: int = 0) -> Any:
    """A class-conditional diffusers UNet on 1x8x8 images (~20k parameters), for diffusion tests."""
    from distil.diffusion.model import UNetSpec, build_unet

    spec = UNetSpec(image_size=8, block_out_channels=(8, 16), norm_num_groups=4)
    return build_unet(spec, num_classes, seed=seed).eval()


def delta_oracle(target: torch.Tensor, schedule: Any, prediction_type: str) -> Any:
    """The exact denoiser of a data distribution that is one image, ``target`` (1, C, H, W):
    x̂₀ = target whatever the input, expressed in ``prediction_type``. Every deterministic
    sampler must return ``target`` from any noise, and every distillation target is known."""
    from distil.diffusion.schedule import prediction_from_x0_eps

    def denoise(
        x_t: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        alpha, sigma = schedule.alpha_sigma(timesteps)
        x0 = target.expand_as(x_t).to(torch.float64)
        a = alpha.reshape(-1, 1, 1, 1)
        s = sigma.reshape(-1, 1, 1, 1)
        eps = (x_t.to(torch.float64) - a * x0) / s
        return prediction_from_x0_eps(x0, eps, alpha, sigma, prediction_type).to(x_t.dtype)

    return denoise


TRICKY_TEXTS = (
    "def f(x):\n    return x  # é 日本 😀\n",
    "  leading spaces, then\ttabs\t\tand a run:" + " " * 20 + "end",
    "\n\n\nclass A:\n        pass\n",
    "naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and <0x41> literally",
    "x",
    "日本語のテキスト😀😀 mixed ASCII",
)
"""Texts that stress byte alignment: multi-byte characters (2, 3 and 4 bytes), emoji split into
byte tokens, whitespace runs and indentation, leading spaces, a literal byte-piece string."""


def make_tokenizer_pair(root: Path) -> dict[str, Path]:
    """Tokenizers that split the same text differently, all trained on the same stdlib snippets:
    a byte-level BPE of 500 (the teacher's kind), a BPE of 320 of the same family (nested in the
    500) and a Metaspace Unigram of 600 with byte fallback (the student's kind)."""
    from distil.data.corpus import (
        stdlib_root,
        train_bpe_tokenizer_from_texts,
        train_unigram_tokenizer_from_texts,
    )

    texts = [p.read_text(encoding="utf-8")[:3000] for p in sorted(stdlib_root().glob("*.py"))[:20]]
    train_bpe_tokenizer_from_texts(texts, root / "bpe500", 500)
    train_bpe_tokenizer_from_texts(texts, root / "bpe320", 320)
    train_unigram_tokenizer_from_texts(texts, root / "uni600", 600)
    return {"bpe500": root / "bpe500", "bpe320": root / "bpe320", "uni600": root / "uni600"}


def word_level_tokenizer(texts: list[str]) -> Any:
    """A whitespace word-level BERT-style tokenizer ([PAD], [UNK], [CLS], [SEP]) trained on
    ``texts``, for tiny Hugging Face encoder and classifier folders."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
