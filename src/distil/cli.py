"""The ``distil`` command line: run, validate, recipes, cp, report, compare, advise, search, cache,
generate, problems, sample, speculate, relabel, serve."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distil.config.loading import ConfigError, apply_overrides, load_yaml, validate_config
from distil.errors import DistilError
from distil.recipes import RECIPES, load_recipe

app = typer.Typer(
    name="distil",
    help="Knowledge distillation: turn a large teacher into a small, fast student that keeps what matters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

# transformers imports torchao when it is installed (the compress extra); on a CPU build torchao
# then logs, at every start, that its CUDA kernels and Triton are missing, and torch logs the
# enum registrations torchao makes. None of it concerns a distil run (the compress recipe names
# which quantisation paths run), so those loggers speak only of errors.
for _noisy in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("distil")
        except PackageNotFoundError:  # a source checkout that was never installed
            from distil import __version__ as found
        console.print(f"distil {found}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    """Knowledge distillation: turn a large teacher into a small, fast student that keeps what matters."""


DEFAULT_CONFIG = "classifier_kd"

# Commands other than `run` that read a config of their own: its YAML says `command: NAME` instead
# of `recipe:`, and `validate` checks it against the model named here (imported when needed).
# The target is a config model, or a function that picks one from the YAML mapping (generate:
# a local teacher folder or an endpoint).
CONFIG_COMMANDS: dict[str, str] = {
    "generate": "distil.remote.config:generate_config_model",
    "relabel": "distil.remote.relabel:RelabelConfig",
}


def shipped_configs() -> dict[str, Path]:
    """Config files shipped inside the package, by name without ``.yaml``."""
    root = resources.files("distil") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def resolve_config_path(spec: str) -> Path:
    """A local YAML path, or the name of a shipped config or recipe."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = shipped_configs()
    if spec in shipped:
        return shipped[spec]
    if spec in RECIPES:
        return shipped[Path(RECIPES[spec].default_config).stem]
    close = difflib.get_close_matches(spec, [*shipped, *RECIPES], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        [f"{spec!r} is neither a YAML file nor a shipped config.{hint} See `distil recipes`."]
    )


def _command_of(data: dict[str, Any]) -> str | None:
    """The ``command:`` of a config that belongs to a command in ``CONFIG_COMMANDS``, if any."""
    command = data.get("command")
    return command if isinstance(command, str) and command in CONFIG_COMMANDS else None


def config_source(path: Path | str) -> str:
    """How messages name a config file: a shipped config by its file name, others by path."""
    path = Path(path)
    shipped = shipped_configs()
    return path.name if shipped.get(path.stem) == path else str(path)


def load_config(spec: str, overrides: list[str]) -> tuple[str, Any, dict[str, Any]]:
    """Read, override and validate a config; return (recipe name, Config, resolved dict)."""
    path = resolve_config_path(spec)
    data = apply_overrides(load_yaml(path), overrides)
    data.pop("search", None)  # a `distil search` YAML runs its base config under `distil run`
    return validate_data(data, spec, path)


def validate_data(
    data: dict[str, Any], spec: str, path: Path | str
) -> tuple[str, Any, dict[str, Any]]:
    """Validate a config mapping against the recipe it names; return (recipe, Config, resolved)."""
    recipe = data.get("recipe")
    if recipe is None and _command_of(data) is not None:
        command = data["command"]
        raise ConfigError(
            [
                f"command: this is a `distil {command}` config, not a recipe's; run it with `distil {command} {spec}`"
            ],
            source=config_source(path),
        )
    if recipe is not None and not isinstance(recipe, str):
        raise ConfigError(
            [f"recipe: must be one recipe name (known: {', '.join(RECIPES)}), got {recipe!r}"],
            source=config_source(path),
        )
    if recipe not in RECIPES:
        close = difflib.get_close_matches(str(recipe), list(RECIPES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            [f"recipe: {recipe!r} is not a recipe{hint} (known: {', '.join(RECIPES)})"],
            source=config_source(path),
        )
    module = load_recipe(recipe)
    cfg = validate_config(module.Config, data, source=config_source(path))
    return recipe, cfg, cfg.model_dump(mode="json")


def load_command_config(command: str, spec: str, overrides: list[str]) -> Any:
    """Read, override and validate the config of a command in ``CONFIG_COMMANDS``."""
    path = resolve_config_path(spec)
    data = apply_overrides(load_yaml(path), overrides)
    if "recipe" in data:
        raise ConfigError(
            [
                f"recipe: this is a `distil run` config ({data['recipe']}); `distil {command}` takes one with "
                f"`command: {command}` (copy one with `distil cp {command} FILE`)"
            ],
            source=config_source(path),
        )
    module, _, name = CONFIG_COMMANDS[command].partition(":")
    target = getattr(importlib.import_module(module), name)
    model = target if isinstance(target, type) else target(data)  # a function picks the model
    return validate_config(model, data, source=config_source(path))


def _fail(exc: Exception) -> None:
    err_console.print(
        f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True, highlight=False
    )
    raise typer.Exit(code=2)


@app.command()
def run(
    config: Annotated[
        str, typer.Argument(help="YAML file or shipped config name")
    ] = DEFAULT_CONFIG,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, e.g. train.lr=3e-4")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the newest run of this name (or --run-dir)")
    ] = False,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="use exactly this run folder")
    ] = None,
) -> None:
    """Run a distillation. With no argument: the built-in default job (MNIST-5k, CNN → MLP)."""
    from distil.training import run_dir as rd
    from distil.training.session import open_session

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(overrides or [])
    if (
        "=" in config and not Path(config).exists()
    ):  # `distil run train.lr=1e-3`: overrides of the default job
        overrides, config = [config, *overrides], DEFAULT_CONFIG
    try:
        recipe, cfg, resolved = load_config(config, overrides)
        name = cfg.run.name or recipe

        def choose() -> Path:
            return rd.choose_run_dir(
                run_dir, resume=resume, output_dir=cfg.run.output_dir, name=name
            )

        def prepare(path: Path) -> None:
            if resume and (path / "config.resolved.yaml").is_file():
                rd.check_resume_config(
                    path,
                    resolved,
                    lambda old: type(cfg).model_validate(old).model_dump(mode="json"),
                )
            rd.write_resolved_config(path, resolved)

        session = open_session(
            choose,
            resume=resume,
            device=cfg.train.device.value,
            mixed_precision=cfg.train.mixed_precision.value,
            log_with=cfg.run.log_with,
            project=name,
            on_run_dir=prepare,
            cpu_threads=cfg.run.cpu_threads,
        )
        if session.accelerator.is_main_process:
            console.print(f"[bold]run folder[/bold] {escape(str(session.run_dir))}")
        try:
            load_recipe(recipe).main(cfg, session)
        except KeyboardInterrupt:  # say how to continue: the last checkpoint is on disk
            again = shlex.join(
                ["distil", "run", config, *overrides, "--resume", "--run-dir", str(session.run_dir)]
            )
            err_console.print(
                f"[bold yellow]interrupted[/bold yellow]; continue from the last checkpoint with: {escape(again)}",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(code=130) from None
        session.accelerator.end_training()
        if session.accelerator.is_main_process:
            console.print(f"[bold]report[/bold] {escape(str(session.run_dir / 'report.md'))}")
    except DistilError as exc:
        _fail(exc)


@app.command()
def validate(
    config: Annotated[str, typer.Argument(help="YAML file or shipped config name")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides")] = None,
) -> None:
    """Check a config (and overrides) without running it; print every problem at once."""
    try:
        command = _command_of(load_yaml(resolve_config_path(config)))
        if command is not None:
            load_command_config(command, config, overrides or [])
            kind = f"`distil {command}`"
        else:
            kind, _cfg, _ = load_config(config, overrides or [])
            raw = load_yaml(resolve_config_path(config))
            if "search" in raw:
                from distil.search.command import check_search

                check_search(raw, overrides or [], validate_data, source=config)
                kind += " (with a valid search: section)"
    except DistilError as exc:
        _fail(exc)
        return
    console.print(f"[green]ok[/green]: {escape(config)} is a valid {escape(kind)} config")


@app.command()
def recipes() -> None:
    """List the recipes and the configs shipped with distil."""
    table = Table(title="distil recipes")
    table.add_column("recipe")
    table.add_column("what it does")
    table.add_column("shipped configs")
    shipped = shipped_configs()
    for name, entry in RECIPES.items():
        mine = sorted(k for k in shipped if load_yaml(shipped[k]).get("recipe") == name)
        table.add_row(name, entry.description, ", ".join(mine))
    console.print(table)


@app.command()
def cp(
    recipe: Annotated[str, typer.Argument(help="recipe or shipped config name")],
    dest: Annotated[Path, typer.Argument(help="where to write the YAML copy")],
) -> None:
    """Copy a shipped config to hack on; run it with `distil run DEST`."""
    try:
        src = resolve_config_path(recipe)
        if not src.is_file():
            raise DistilError(f"{recipe!r}: no such shipped config")
        target = dest / src.name if dest.is_dir() else dest
        if not target.parent.is_dir():
            raise DistilError(
                f"{target.parent} does not exist; create the folder first or choose another destination"
            )
        if target.exists():
            raise DistilError(f"{target} exists; choose another destination or delete it first")
        shutil.copyfile(src, target)
    except DistilError as exc:
        _fail(exc)
        return
    console.print(f"copied {src.name} to {target}; run it with: distil run {target}", markup=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder")]) -> None:
    """Rewrite report.md and report.html from a run's report.json and print the summary."""
    from distil.evaluation.report import load_report, print_report, write_report

    try:
        data = load_report(run_dir)
    except DistilError as exc:
        _fail(exc)
        return
    write_report(run_dir, data)
    print_report(data, console)
    console.print(f"[bold]report[/bold] {escape(str(run_dir / 'report.md'))}")
    console.print(f"[bold]report[/bold] {escape(str(run_dir / 'report.html'))}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="two or more run folders")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder for compare.{json,md,html} (default: the runs' parent)"),
    ] = None,
) -> None:
    """Put runs side by side: the config keys that differ, then each run's headline numbers."""
    from distil.evaluation.compare import (
        compare_runs,
        default_out_dir,
        terminal_table,
        write_comparison,
    )
    from distil.evaluation.report import print_table

    try:
        comparison = compare_runs(run_dirs)
    except DistilError as exc:
        _fail(exc)
        return
    print_table(terminal_table(comparison), console, title=f"distil compare ({len(run_dirs)} runs)")
    for path in write_comparison(comparison, run_dirs, out or default_out_dir(run_dirs)):
        console.print(f"[bold]wrote[/bold] {escape(str(path))}")


@app.command()
def advise(
    teacher: Annotated[
        str,
        typer.Argument(
            help="HF model folder, YAML or shipped config (e.g. lm_kd), or an inline shape such as layers=12,hidden=768,heads=12,ffn=3072,vocab=32000"
        ),
    ],
    speedup: Annotated[
        float | None, typer.Option("--speedup", help="wanted batch-1 speed-up over the teacher")
    ] = None,
    size: Annotated[
        float | None,
        typer.Option("--size", help="wanted student/teacher parameter fraction, e.g. 0.25"),
    ] = None,
    params: Annotated[
        str | None, typer.Option("--params", help="largest student, e.g. 125M")
    ] = None,
    memory: Annotated[
        str | None, typer.Option("--memory", help="accelerator memory per process, e.g. 24GB")
    ] = None,
    dataset_tokens: Annotated[
        str | None, typer.Option("--dataset-tokens", help="tokens the teacher labels, e.g. 500M")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="sequences per step")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per sequence")] = 1024,
    top_k: Annotated[
        int, typer.Option("--top-k", help="teacher log-probs a cache keeps per token")
    ] = 64,
    epochs: Annotated[int, typer.Option("--epochs", help="passes over the data")] = 1,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure", help="also build and time each candidate on CPU (random weights)"
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the advice as JSON here")
    ] = None,
) -> None:
    """Propose student shapes for a teacher and a target, with estimated size, speed and memory."""
    import json as _json

    from distil.planning import advise as adv

    try:
        path = Path(teacher)
        if path.suffix in (".yaml", ".yml") or (not path.exists() and teacher in shipped_configs()):
            recipe, cfg, data = load_config(teacher, [])
            if recipe == "classifier_kd" and data["teacher"]["model"].get("zoo") is not None:
                advice = adv.advise_classifier(cfg, teacher, speedup=speedup, size_ratio=size)
                adv.print_advice(advice, console)
                if json_out is not None:
                    json_out.write_text(_json.dumps(advice, indent=1, default=str))
                return
            teacher = adv.teacher_spec_from_config(data, teacher)
        budget = adv.Budget(
            memory_bytes=adv.parse_count(memory, binary=True) if memory else None,
            dataset_tokens=adv.parse_count(dataset_tokens) if dataset_tokens else None,
            batch_size=batch_size,
            seq_len=seq_len,
            top_k=top_k,
            epochs=epochs,
        )
        max_params = adv.parse_count(params) if params else None
        advice = adv.advise(
            teacher,
            speedup=speedup,
            size_ratio=size,
            max_params=max_params,
            budget=budget,
            measure=measure,
        )
    except DistilError as exc:
        _fail(exc)
        return
    adv.print_advice(advice, console)
    if json_out is not None:
        json_out.write_text(_json.dumps(advice, indent=1, default=str))
        console.print(f"[bold]wrote[/bold] {escape(str(json_out))}")


@app.command()
def search(
    config: Annotated[
        str | None,
        typer.Argument(
            help="YAML (its search: section is read) or shipped config; omit to resume --study-dir"
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides, search.* ones too")
    ] = None,
    space: Annotated[
        list[str] | None,
        typer.Option(
            "--space",
            help="KEY=DIST: loguniform(1,8), uniform(0,1), int(1,4), categorical(a,b) or a YAML list",
        ),
    ] = None,
    objective: Annotated[
        list[str] | None,
        typer.Option(
            "--objective",
            help="maximize:METRIC or minimize:METRIC: a report summary label or PART.ROLE.KEY "
            "(e.g. table.student.val_accuracy)",
        ),
    ] = None,
    cost: Annotated[
        list[str] | None, typer.Option("--cost", help="cost metric drawn on the Pareto front")
    ] = None,
    trials: Annotated[int | None, typer.Option("--trials", help="budget: trials")] = None,
    wall_time: Annotated[
        str | None, typer.Option("--time", help="budget: busy wall time, e.g. 30m")
    ] = None,
    examples: Annotated[
        int | None, typer.Option("--examples", help="budget: training examples")
    ] = None,
    study_dir: Annotated[
        Path | None, typer.Option("--study-dir", help="the study folder (resumed when it exists)")
    ] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="database URL (default: SQLite in the study)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="worker processes on this machine")
    ] = None,
    stage: Annotated[
        str, typer.Option("--stage", help="all, search, select, final or report")
    ] = "all",
    worker_index: Annotated[
        int | None,
        typer.Option("--worker-index", hidden=True, help="run as worker K of --study-dir"),
    ] = None,
) -> None:
    """Search hyperparameters and student shapes with Optuna: trials are resumable runs, the top
    candidates are re-run over seeds, and the study report shows the Pareto front of quality
    against cost."""
    from distil.search import study as st
    from distil.search.command import SearchFlags, Stage, check_search, run_stages

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            chosen = Stage(stage)
        except ValueError:
            raise DistilError(
                f"--stage {stage!r}: choose one of {', '.join(s.value for s in Stage)}"
            ) from None
        flags = SearchFlags(
            space=list(space or []),
            objectives=list(objective or []),
            costs=list(cost or []),
            trials=trials,
            wall_time=wall_time,
            examples=examples,
            storage=storage,
            workers=workers,
        )
        if config is None and study_dir is None:
            raise DistilError("give a CONFIG to start a study, or --study-dir to resume one")
        if worker_index is not None and study_dir is not None:
            # One of the workers `--workers N` starts: run trials of the stored study, in this
            # process, and change nothing in the folder's spec.
            ctx = st.load(study_dir)
            ctx = dataclasses.replace(ctx, search=ctx.search.model_copy(update={"workers": 1}))
            chosen = Stage.search
        elif config is None and study_dir is not None and not overrides and flags == SearchFlags():
            ctx = st.load(study_dir)  # resume exactly what the folder holds
        else:
            if config is None and study_dir is not None:
                stored = st.load(study_dir)
                raw = {**stored.base, "search": stored.search.model_dump(mode="json")}
                source = str(study_dir / st.SPEC_FILE)
            else:
                source = str(config)
                raw = load_yaml(resolve_config_path(source))
            recipe, base, search_cfg = check_search(
                raw, list(overrides or []), validate_data, source=source, flags=flags
            )
            root = study_dir or Path(base.get("run", {}).get("output_dir", "runs")) / (
                f"search-{base.get('run', {}).get('name') or recipe}"
            )
            ctx = st.prepare(root, recipe, base, search_cfg)
        section = ctx.search
        reference = (
            resolve_config_path(section.final.reference)
            if section.final is not None and section.final.reference is not None
            else None
        )
        console.print(f"[bold]study[/bold] {ctx.root} ({ctx.storage_url})")
        run_stages(
            ctx,
            chosen,
            reference=reference,
            say=lambda text: console.print(text, markup=False, soft_wrap=True),
            worker_index=worker_index or 0,
        )
    except DistilError as exc:
        _fail(exc)


def _cache_write(config: str, overrides: list[str]) -> None:
    """Write (or complete) the ``teacher.cache`` of any recipe's config ahead of training; the
    run then reads it instead of running the teacher (the same writer the run uses itself)."""
    from distil.training.session import Session, open_session

    recipe, cfg, _ = load_config(config, overrides)
    module = load_recipe(recipe)
    cache = getattr(getattr(cfg, "teacher", None), "cache", None)
    if not hasattr(module, "write_teacher_cache"):
        raise DistilError(f"{recipe} has no teacher whose outputs could be cached")
    if cache is None:
        raise DistilError(
            f"{recipe}: teacher.cache is not set; say where it goes: teacher.cache.path=runs/teacher-cache"
        )

    def session() -> Session:  # recipes that run their teacher through Accelerate ask for one
        return open_session(
            lambda: Path(cache.path) / "work",
            resume=True,
            device=cfg.train.device.value,
            mixed_precision="no",
            log_with=[],
            project=recipe,
            cpu_threads=cfg.run.cpu_threads,
        )

    path, main_process, done = module.write_teacher_cache(cfg, session)
    console.print(f"[bold]cache[/bold] {escape(str(path))}: {done}", soft_wrap=True)
    if main_process:
        _cache_inspect(path, verify=False)
        console.print(  # the same config and overrides read the cache it just wrote
            f"train from it: distil run {' '.join([config, *overrides])}",
            markup=False,
            soft_wrap=True,
        )


def _cache_inspect(path: Path, *, verify: bool) -> None:
    from distil.cache.reader import summarize, verify_cache

    table = Table(title=escape(f"teacher cache {path}"), show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in summarize(path).items():
        table.add_row(key, escape(f"{value:,.4g}" if isinstance(value, float) else str(value)))
    console.print(table)
    if verify:
        problems = verify_cache(path)
        for problem in problems:
            err_console.print(
                f"[bold red]corrupt:[/bold red] {escape(problem)}", soft_wrap=True, highlight=False
            )
        if problems:
            raise typer.Exit(code=1)
        console.print("[green]ok[/green]: every shard matches its sha256 in the manifest")


def _cache_from_api(args: list[str]) -> None:
    from distil.remote.api_cache import from_api

    usage = (
        "usage: distil cache from-api GENERATED OUT tokenizer=DIR [max_length=256] "
        "[eval_fraction=0.05] [examples_per_shard=256]"
    )
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = set(options) - {"tokenizer", "max_length", "eval_fraction", "examples_per_shard"}
    if len(positional) != 2 or "tokenizer" not in options or unknown:
        raise DistilError(usage + (f" (unknown: {sorted(unknown)})" if unknown else ""))
    try:
        max_length = int(options.get("max_length", "256"))
        eval_fraction = float(options.get("eval_fraction", "0.05"))
        per_shard = int(options.get("examples_per_shard", "256"))
    except ValueError as exc:
        raise DistilError(f"{usage} ({exc})") from exc
    result = from_api(
        Path(positional[0]),
        Path(positional[1]),
        tokenizer_path=Path(options["tokenizer"]),
        max_length=max_length,
        eval_fraction=eval_fraction,
        examples_per_shard=per_shard,
    )
    left = dict(result.excluded) or "none"
    console.print(
        f"[bold]from-api[/bold] {escape(str(result.out))}: {result.examples} training examples "
        f"({result.positions} positions with top-k targets), {result.eval_examples} held out; "
        f"records left out: {left}; cut: {dict(result.cut) or 'none'}",
        soft_wrap=True,
    )
    evals = f", eval: [{result.eval_file}]" if result.eval_file else ""
    console.print(
        f"train on it (token-level KD, kd.kd_temperature=1): distil run lm_kd 'teacher.model={{hf: TEACHER}}' "
        f"'data.source={{train: [{result.train_file}]{evals}}}' data.format=prompt_completion "
        f"data.max_length={max_length} teacher.cache.path={result.cache} kd.kd_temperature=1",
        markup=False,
        soft_wrap=True,
    )
    _cache_inspect(result.cache, verify=False)


@app.command()
def cache(
    args: Annotated[
        list[str],
        typer.Argument(
            help="CONFIG \\[overrides], or: inspect PATH, or: from-api GENERATED OUT ..."
        ),
    ],
    verify: Annotated[
        bool, typer.Option("--verify", help="with inspect: re-check every shard's sha256")
    ] = False,
) -> None:
    """Run the teacher once and store its top-k outputs: `distil cache CONFIG \\[overrides]`, e.g. `distil cache lm_kd \\[teacher.cache.k=8 ...]`; summarise a cache: `distil cache inspect PATH \\[--verify]`; turn an endpoint's top_logprobs into a cache: `distil cache from-api GENERATED OUT tokenizer=DIR \\[max_length=N]`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args[0] == "from-api":
            _cache_from_api(args[1:])
            return
        if args[0] == "inspect":
            if len(args) != 2:
                raise DistilError("usage: distil cache inspect PATH [--verify]")
            _cache_inspect(Path(args[1]), verify=verify)
        else:
            if verify:
                raise DistilError("--verify goes with `distil cache inspect PATH`")
            _cache_write(args[0], args[1:])
    except DistilError as exc:
        _fail(exc)


@app.command()
def generate(
    config: Annotated[str, typer.Argument(help="YAML file or shipped config name")] = "generate",
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="dotted overrides, e.g. generation.max_new_tokens=128"),
    ] = None,
) -> None:
    """Sequence-level KD data: the teacher (a local folder, or an OpenAI-compatible endpoint) writes completions for a prompt set, in resumable shards that `lm_kd` trains on (data.source={train: \\[OUTPUT]}, data.format=prompt_completion)."""
    from distil.generation import write_generations
    from distil.remote.config import EndpointGenerateConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(overrides or [])
    if (
        "=" in config and not Path(config).exists()
    ):  # `distil generate output=...`: the shipped config
        overrides, config = [config, *overrides], "generate"
    try:
        cfg = load_command_config("generate", config, overrides)
        if isinstance(cfg, EndpointGenerateConfig):
            _generate_endpoint(cfg)
            return
        result = write_generations(cfg)
    except DistilError as exc:
        _fail(exc)
        return
    counts = result.manifest["counts"]
    console.print(
        f"[bold]generate[/bold] {escape(str(result.path))}: wrote {result.shards_written} shard(s), {result.shards_skipped} already "
        f"complete; {counts['records']} completions of {counts['prompts']} prompts, {counts['generated_tokens']} tokens "
        f"({counts['ended_by_eos']} ended by EOS), {counts['tokens_per_s'] or 0:,.1f} tokens/s",
        soft_wrap=True,
    )
    console.print(
        f"train on it: distil run lm_kd 'data.source={{train: [{result.path}]}}' data.format=prompt_completion",
        markup=False,
        soft_wrap=True,
    )


@app.command()
def sample(
    model: Annotated[
        Path, typer.Argument(help="a diffusion model folder, or a run folder with one in final/")
    ],
    sampler: Annotated[
        list[str] | None,
        typer.Option(
            "--sampler",
            help="ddim, dpmpp_2m, euler, unipc, lcm or truncated_karras (repeat for several; "
            "default: the model's own)",
        ),
    ] = None,
    steps: Annotated[
        list[int] | None,
        typer.Option(
            "--steps", help="sampling steps (repeat for several; default: the model's own)"
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", help="guidance scale s (1 = none; default: the model's own)"),
    ] = None,
    per_class: Annotated[
        int, typer.Option("--per-class", help="images per class (grid columns)")
    ] = 8,
    seed: Annotated[
        int, typer.Option("--seed", help="initial-noise seed (shared by all grids)")
    ] = 0,
    early_stop_output: Annotated[
        str,
        typer.Option(
            "--early-stop-output",
            help="truncated_karras only: state (the paper: stop at sigma_end) or denoised (+1 NFE)",
        ),
    ] = "state",
    zoom: Annotated[
        int, typer.Option("--zoom", help="nearest-neighbour upscaling of the PNGs")
    ] = 4,
    out: Annotated[
        Path | None, typer.Option("--out", help="output folder (default: MODEL/samples)")
    ] = None,
) -> None:
    """Write image grids of a diffusion model: one PNG per sampler and step count, a row per class."""
    from pydantic import ValidationError

    from distil.diffusion.grids import write_sample_grids
    from distil.diffusion.model import find_model_folder, load_card
    from distil.diffusion.sampling import SamplerSpec

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        card = load_card(model)
        defaults = card.sampling
        try:
            specs = [
                SamplerSpec.model_validate(
                    {
                        "kind": kind,
                        "steps": n,
                        "guidance_scale": defaults.guidance_scale if guidance is None else guidance,
                        "early_stop_output": early_stop_output,
                    }
                )
                for kind in (sampler or [defaults.sampler])
                for n in (steps or [defaults.steps])
            ]
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise DistilError(f"bad sampling option: {problems}") from exc
        if per_class < 1 or zoom < 1:
            raise DistilError("--per-class and --zoom must be at least 1")
        target = out or find_model_folder(model) / "samples"
        records = write_sample_grids(
            model, target, specs, per_class=per_class, seed=seed, zoom=zoom
        )
    except DistilError as exc:
        _fail(exc)
        return
    table = Table(title=f"distil sample {escape(str(model))}")
    for column in ("grid", "NFE/image", "s/image"):
        table.add_column(column)
    for record in records:
        table.add_row(record.path, f"{record.nfe_per_image:g}", f"{record.seconds_per_image:.4f}")
    console.print(table)
    console.print(f"[bold]wrote[/bold] {escape(str(target))}/grids.json", soft_wrap=True)


@app.command()
def speculate(
    target: Annotated[str, typer.Argument(help="target HF causal-LM folder (with its tokenizer)")],
    draft: Annotated[str, typer.Argument(help="draft HF causal-LM folder, same tokenizer")],
    gamma: Annotated[
        list[int] | None, typer.Option("--gamma", help="draft tokens per round; repeat for several")
    ] = None,
    temperature: Annotated[
        list[float] | None,
        typer.Option("--temperature", help="sampling temperature, 0 = greedy; repeat for several"),
    ] = None,
    prompts: Annotated[int, typer.Option("--prompts", help="prompts evaluated")] = 64,
    prompts_file: Annotated[
        str | None,
        typer.Option("--prompts-file", help="JSONL, a `prompt` a line (default: held-out corpus)"),
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", help="tokens a corpus prompt")
    ] = 64,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows decoded together")] = 16,
    speed_gamma: Annotated[int, typer.Option("--speed-gamma", help="γ of the wall-clock run")] = 4,
    speed_prompts: Annotated[
        int, typer.Option("--speed-prompts", help="prompts timed at batch 1; 0 = skip")
    ] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path, typer.Option("--out", help="report folder")] = Path("runs/speculate"),
) -> None:
    """Measure a draft for speculative decoding with a target: α, τ by γ (measured and from α),
    lossless checks, costs and speed-up; writes report.{json,md,html} to --out."""
    from distil.evaluation.drafts import SpeculateConfig, evaluate_draft
    from distil.evaluation.report import print_report, write_report
    from distil.training.run_dir import environment, write_env, write_resolved_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {
        "target": target,
        "draft": draft,
        "output": str(out),
        "prompts": prompts,
        "prompts_file": prompts_file,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "speed_gamma": speed_gamma,
        "speed_prompts": speed_prompts,
        "seed": seed,
    }
    if gamma:
        options["gammas"] = gamma
    if temperature:
        options["sampling_temperatures"] = temperature
    try:
        cfg = validate_config(SpeculateConfig, options, source="distil speculate")
        report_data = evaluate_draft(cfg)
    except DistilError as exc:
        _fail(exc)
        return
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg.model_dump(mode="json"))
    write_env(out, environment(["cpu"], 1))
    write_report(out, report_data)
    print_report(report_data, console)
    console.print(f"[bold]report[/bold] {out / 'report.md'}")


@app.command()
def problems(
    out: Annotated[Path, typer.Argument(help="output folder")] = Path("runs/reasoning-data"),
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="e.g. kinds=[addition,sorting] train_examples=5000 seed=1"),
    ] = None,
) -> None:
    """Checkable multi-step problems with worked solutions (train, pool, held_out, harder JSONL
    splits) and a digit-level tokenizer, for lm_pretrain, distil generate and trace verification."""
    from distil.data.reasoning import (
        ReasoningSplits,
        read_problems,
        write_reasoning_splits,
        write_reasoning_tokenizer,
    )

    try:
        data = apply_overrides(ReasoningSplits().model_dump(mode="json"), overrides or [])
        spec = validate_config(ReasoningSplits, data, source="distil problems")
        paths = write_reasoning_splits(spec, out)
        tokenizer = write_reasoning_tokenizer(out / "tokenizer")
    except (DistilError, ConfigError) as exc:
        _fail(exc)
        return
    for split, path in paths.items():
        console.print(f"{split:>9}: {escape(str(path))} ({len(read_problems(path))} problems)")
    console.print(f"tokenizer: {escape(str(tokenizer))}")
    console.print(
        f"train a teacher: distil run lm_pretrain-reasoning data.source.train=[{paths['train']}] "
        f"data.source.eval=[{paths['held_out']}] tokenizer.path={tokenizer}",
        markup=False,
        soft_wrap=True,
    )


def _generate_endpoint(cfg: Any) -> None:
    from distil.remote.generate import generate_from_endpoint

    def say(text: str) -> None:
        console.print(f"[bold]mode[/bold] {escape(text)}", soft_wrap=True)

    result = generate_from_endpoint(cfg, announce=say)
    m = result.manifest
    counts, ledger, run = m["counts"], m["ledger"], result.run
    state = "complete" if m["complete"] else f"incomplete ({counts['missing']} missing"
    state += "" if m["complete"] else f"; stopped: {m['stopped']})" if m["stopped"] else ")"
    console.print(
        f"[bold]generate[/bold] {escape(str(result.path))}: {state}; {counts['records']} records "
        f"({run['records_new']} new, {counts['rejected']} rejected, {counts['failed']} failed for good); "
        f"this run sent {run['requests_sent']} request(s), {run['retries']} retries, errors "
        f"{run['errors'] or 'none'}; ledger {ledger['prompt_tokens']:,} prompt + "
        f"{ledger['completion_tokens']:,} completion tokens, {ledger['cost']:.6g} {ledger['currency']}",
        soft_wrap=True,
    )
    if m["stopped"] == "budget":
        console.print(
            "budget reached: raise budget.max_cost / budget.max_tokens and re-run the same command "
            "to continue (nothing answered is sent again)",
            soft_wrap=True,
        )
    fmt = "chat" if m["teacher"]["api"] == "chat" else "prompt_completion"
    console.print(
        f"train on it: distil run lm_kd 'data.source={{train: [{result.path}]}}' data.format={fmt}",
        markup=False,
        soft_wrap=True,
    )
    if m["signal"].startswith("text+top_logprobs"):
        console.print(
            f"token-level KD: distil cache from-api {result.path} CACHE tokenizer=TEACHER_TOKENIZER",
            markup=False,
            soft_wrap=True,
        )


@app.command()
def relabel(
    config: Annotated[str, typer.Argument(help="YAML file with `command: relabel`")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides")] = None,
) -> None:
    """Label unlabelled text with a teacher behind an OpenAI-compatible endpoint (resumable,
    budgeted); writes labels.csv that `classifier_kd` trains on (data.source={train: \\[FILE]})."""
    from distil.remote.relabel import relabel as run_relabel

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def say(text: str) -> None:
        console.print(f"[bold]mode[/bold] {escape(text)}", soft_wrap=True)

    try:
        result = run_relabel(load_command_config("relabel", config, overrides or []), announce=say)
    except DistilError as exc:
        _fail(exc)
        return
    ledger = result.job.manifest["ledger"]
    console.print(
        f"[bold]relabel[/bold] {escape(str(result.label_file))}: {result.labelled} labelled "
        f"{result.label_counts}, {result.invalid} invalid answers (invalid.jsonl), "
        f"{result.unanswered} unanswered; labels bought {result.job.manifest['counts']['records']}, "
        f"{ledger['total_tokens']:,} tokens, {ledger['cost']:.6g} {ledger['currency']}",
        soft_wrap=True,
    )
    console.print(
        f"train on it: distil run classifier_kd 'data.source={{train: [{result.label_file}]}}' "
        "data.text_column=text data.label_column=label",
        markup=False,
        soft_wrap=True,
    )


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="Hugging Face causal-LM (or classifier) folder")],
    port: Annotated[int, typer.Option("--port", help="port on 127.0.0.1")] = 8765,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="name clients send (default: folder name)")
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option("--api-key-env", help="require the key held in this environment variable"),
    ] = None,
    usage_log: Annotated[
        Path | None, typer.Option("--usage-log", help="append each answer's usage (JSONL)")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads")] = None,
) -> None:
    """Serve a local model behind an OpenAI-compatible API on 127.0.0.1 (completions, chat,
    n, seed, logprobs/top_logprobs, usage), for `distil generate` / `distil relabel`."""
    from distil.remote.server import serve as run_server

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_server(
            folder,
            port=port,
            model_name=model_name,
            api_key_env=api_key_env,
            usage_log=usage_log,
            threads=threads,
        )
    except DistilError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])
