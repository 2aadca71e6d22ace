"""`distil speculate TARGET DRAFT`: a draft measured for speculative decoding, end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_lm_fixture, run_cli, write_fixture


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from distil.models.lm import init_student_from_teacher, load_causal_lm, save_model_folder
    from distil.models.vocab import load_tokenizer_folder

    root = Path(tmp_path_factory.mktemp("speculate"))
    fx = make_lm_fixture(root)
    teacher = load_causal_lm(fx["teacher"])
    draft = init_student_from_teacher(teacher, num_layers=1)
    save_model_folder(draft, root / "draft", tokenizer=load_tokenizer_folder(fx["tok"]))
    texts = [json.loads(line)["text"] for line in fx["text"].read_text().splitlines()]
    prompts = [{"prompt": t[i : i + 40]} for t in texts for i in (0, 100) if len(t) > i + 40]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    yield {**fx, "draft": root / "draft", "prompts": root / "prompts.jsonl"}


def _args(lm: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "speculate",
        str(lm["teacher"]),
        str(lm["draft"]),
        "--prompts-file",
        str(lm["prompts"]),
        "--prompts",
        "6",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "4",
        "--gamma",
        "1",
        "--gamma",
        "3",
        "--speed-gamma",
        "3",
        "--speed-prompts",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_speculate_writes_a_report_whose_numbers_agree(lm: dict[str, Path], tmp_path: Path) -> None:
    code, output = run_cli(_args(lm, tmp_path / "out"))
    assert code == 0, output
    out = tmp_path / "out"
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    part = report["speculative"]
    rows = part["table"]["rows"]
    assert [(r["mode"], r["gamma"]) for r in rows] == [
        ("greedy", 1),
        ("greedy", 3),
        ("T=1", 1),
        ("T=1", 3),
    ]
    for key, check in part["lossless"].items():
        if key.startswith("greedy"):
            assert check["identical_rows"] == check["rows"] == 6
            assert check["calls_from_alpha"] == check["calls_counted"]
        else:
            assert 0 <= check["p_value"] <= 1 and check["samples"] == 1000
    for r in rows:
        assert 1 <= r["tau"] <= r["gamma"] + 1 and 0 <= r["alpha"] <= 1
        assert r["tau_ratio"] == pytest.approx(r["tau"] / r["tau_predicted"])
    assert [r["speedup_measured"] is not None for r in rows] == [False, True, False, True]
    assert len(part["by_position"]["greedy"]["3"]) == 3
    assert part["costs"]["cost_ratio"] > 0 and set(part["costs"]["verify_cost"]) == {"1", "3"}
    assert (out / "plots" / "speculative_position.png").is_file()
    assert (out / "plots" / "speculative_tau.png").is_file()
    page = (out / "report.html").read_text()
    assert 'id="speculative"' in page and "Lossless checks" in page
    markdown = (out / "report.md").read_text()
    assert "## Speculative decoding" in markdown and "τ from α" in markdown
    assert (out / "config.resolved.yaml").is_file() and (out / "env.json").is_file()


def test_speculate_refuses_bad_options_and_other_tokenizers(
    lm: dict[str, Path], tmp_path: Path
) -> None:
    code, output = run_cli(_args(lm, tmp_path / "a", "--gamma", "0"))
    assert code == 2 and "gammas" in output
    from distil.models.lm import load_causal_lm, save_model_folder
    from distil.models.vocab import load_tokenizer_folder

    write_fixture(tmp_path)  # another tokenizer (300 ids)
    other = tmp_path / "other-draft"
    save_model_folder(
        load_causal_lm(lm["draft"]), other, tokenizer=load_tokenizer_folder(tmp_path / "tok")
    )
    args = _args(lm, tmp_path / "b")
    args[2] = str(other)
    code, output = run_cli(args)
    assert code == 2 and "tokenizer" in output.lower()
