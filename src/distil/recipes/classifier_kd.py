"""Recipe ``classifier_kd``: distil a classifier teacher into a smaller classifier student.

Hinton et al. (2015): the student minimises ``(1 - kd_weight) * CE(labels) + kd_weight * T² *
KL(teacher_T || student_T)``; the mix lives in ``distil.losses.objective``. The run trains the
teacher first when asked (so the built-in job needs nothing downloaded), distils the student,
trains the same student without the teacher as a baseline, and reports what the student kept
and what it costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from distil.cache.examples import ExampleCache, write_example_cache
from distil.cache.manifest import teacher_fingerprint, tensors_fingerprint
from distil.config.base import StrictModel
from distil.config.sections import ModelSpec, RunSection, TrainSection
from distil.data.classification import (
    BUILTIN_DATASETS,
    ClassificationData,
    check_labels,
    load_files,
)
from distil.data.mixing import apply_mix, sample_mix
from distil.errors import DistilError
from distil.evaluation import classification as metrics
from distil.evaluation.calibration import fidelity_part
from distil.evaluation.cost import cpu_latency_ms, cpu_threads, peak_forward_memory_bytes
from distil.evaluation.report import cost_part, print_report, quality_part, write_report
from distil.losses.classifier import mixed_targets
from distil.losses.objective import (
    ObjectiveOutput,
    classifier_objective,
    feature_objective,
    mixup_classifier_objective,
)
from distil.models.classifier import (
    BuiltModel,
    Inputs,
    build_classifier,
    count_parameters,
    load_weights,
    logits_of,
    save_model,
)
from distil.models.features import (
    FeatureDistiller,
    FeatureLoss,
    FeatureTerm,
    LayerMapStrategy,
    auto_layer_map,
    capture_features,
    feature_distiller,
    feature_shapes,
    find_blocks,
)
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)


class DataSection(StrictModel):
    """A built-in dataset by name, or local files with named columns."""

    dataset: str | None = "digits"
    train_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str = "label"
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    split_seed: int = Field(
        default=0,
        description="seed of the train/test split, kept apart from `seed` so runs share a test set",
    )
    train_limit: int | None = Field(
        default=None, ge=1, description="use only this many training examples"
    )

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in BUILTIN_DATASETS:
            import difflib

            close = difflib.get_close_matches(v, list(BUILTIN_DATASETS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown dataset {v!r}; {hint}built-in: {sorted(BUILTIN_DATASETS)} (or set train_file)"
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.dataset is None) == (self.train_file is None):
            raise ValueError(
                "set exactly one of data.dataset (built-in) or data.train_file (local file)"
            )
        return self


class TeacherSection(StrictModel):
    model: ModelSpec = ModelSpec(zoo="cnn", kwargs={"channels": [32, 64, 64]})
    checkpoint: str | None = Field(
        default=None, description="safetensors weights for a zoo/factory teacher"
    )
    train: bool = Field(default=False, description="train the teacher first, in this run")
    training: TrainSection = TrainSection()
    cache: str | None = Field(
        default=None,
        description="folder of a teacher cache: its logits (and the kd.features maps) written (or completed) once, "
        "then read each step instead of running the teacher (not with mixup or cutmix)",
    )
    cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="storage dtype of cached logits"
    )
    cache_feature_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float16", description="storage dtype of cached feature maps (kd.features)"
    )


class StudentSection(StrictModel):
    model: ModelSpec = ModelSpec(zoo="mlp", kwargs={"hidden": [32]})


class AutoFeatures(StrictModel):
    """Feature terms chosen from the models' block lists instead of named by hand."""

    layer_map: LayerMapStrategy = Field(
        default=LayerMapStrategy.SHAPE,
        description="shape: each student block to the deepest teacher block of its geometry; uniform: spread over "
        "depth; last_k: the last k blocks",
    )
    k: int = Field(default=1, ge=1, description="layer_map=last_k: how many blocks")
    loss: FeatureLoss = FeatureLoss.HINT
    weight: float = Field(default=1.0, ge=0, description="weight of each paired term")
    kd_temperature: float = Field(default=1.0, gt=0, description="τ of cwd")


class KDSection(StrictModel):
    kd_weight: float = Field(
        default=0.9, ge=0, le=1, description="weight of the soft term; 1 - it weighs hard CE"
    )
    kd_temperature: float = Field(default=4.0, gt=0)
    divergence: str = "forward_kl"
    features: list[FeatureTerm] = Field(
        default_factory=list,
        description="feature KD: [{student: stages.1, teacher: stages.1, loss: cwd|hint|attention, weight: 1.0}]",
    )
    auto_features: AutoFeatures | None = Field(
        default=None,
        description="feature terms paired automatically over the models' blocks: {layer_map: shape|uniform|last_k, loss, weight}",
    )
    mixup_alpha: float = Field(
        default=0.0,
        ge=0,
        description="mixup Beta(α, α) in the student and baseline phases; the teacher sees the same mix",
    )
    cutmix_alpha: float = Field(
        default=0.0, ge=0, description="cutmix Beta(α, α); with mixup too, each batch picks one"
    )


class EvalSection(StrictModel):
    baseline: bool = Field(default=True, description="also train the student without the teacher")
    throughput_batch: int = Field(default=256, ge=1)


class Config(StrictModel):
    recipe: Literal["classifier_kd"] = "classifier_kd"
    seed: int = 0
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    student: StudentSection = StudentSection()
    train: TrainSection = TrainSection()
    kd: KDSection = KDSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _cache_needs_plain_logit_kd(self) -> Config:
        live_only = [
            name
            for name, on in (
                ("kd.mixup_alpha", self.kd.mixup_alpha > 0),
                ("kd.cutmix_alpha", self.kd.cutmix_alpha > 0),
            )
            if on
        ]
        if self.teacher.cache is not None and live_only:
            raise ValueError(
                f"teacher.cache stores the teacher's logits on the unmixed training examples, but {', '.join(live_only)} "
                "needs the live teacher's outputs on what the student sees; remove teacher.cache or those settings"
            )
        return self


def load_data(cfg: Config) -> ClassificationData:
    d = cfg.data
    if d.dataset is not None:
        data = BUILTIN_DATASETS[d.dataset][0](d.test_fraction, d.split_seed)
    else:
        assert d.train_file is not None
        data = load_files(
            d.train_file,
            d.test_file,
            text_column=d.text_column,
            image_column=d.image_column,
            label_column=d.label_column,
            test_fraction=d.test_fraction,
            seed=d.split_seed,
        )
    if d.train_limit is not None and d.train_limit < len(data.train):
        keep = torch.randperm(
            len(data.train), generator=torch.Generator().manual_seed(d.split_seed)
        )[: d.train_limit]
        data = ClassificationData(
            data.name,
            data.train.subset(keep.sort().values.numpy()),
            data.test,
            data.class_names,
            data.modality,
        )
    check_labels(data)
    return data


def _take(inputs: Inputs, index: torch.Tensor, device: torch.device) -> Inputs:
    return {k: v[index].to(device) for k, v in inputs.items()}


def _check_classes(built: BuiltModel, inputs: Inputs, num_classes: int, role: str) -> None:
    with torch.no_grad():
        out = logits_of(built.module.eval(), {k: v[:2] for k, v in inputs.items()})
    if out.shape[-1] != num_classes:
        raise DistilError(
            f"the {role} outputs {out.shape[-1]} classes but the dataset has {num_classes}; "
            f"give the {role} a head of {num_classes} classes"
        )


@dataclass(frozen=True)
class KDStep:
    """What one micro-batch needs besides its example ids: the models, the encoded data, the
    teacher's signal (live or cached) and the loss settings of the phase."""

    model: nn.Module  # the student's forward (DDP-wrapped when several processes)
    student: nn.Module  # the same, unwrapped: feature capture hooks attach here
    inputs: Inputs
    labels: torch.Tensor
    kd: KDSection
    mix: bool  # mixup/cutmix: the student and baseline phases, never the teacher's
    device: torch.device
    teacher: BuiltModel | None = None
    teacher_inputs: Inputs | None = None
    teacher_cache: ExampleCache | None = None
    features: FeatureDistiller | None = None


def kd_loss_step(ctx: KDStep, ids: torch.Tensor, window_items: float) -> ObjectiveOutput:
    """One micro-batch of Hinton KD: ``(1 - w)·CE + w·T²·D(teacher_T ‖ student_T)`` (CE alone
    without a teacher), on mixed images when mixup/cutmix is on, plus the feature terms."""
    kd, fkd, cache = ctx.kd, ctx.features, ctx.teacher_cache
    x_s, y = _take(ctx.inputs, ids, ctx.device), ctx.labels[ids].to(ctx.device)
    x_t = None
    if ctx.teacher is not None and ctx.teacher_inputs is not None and cache is None:
        x_t = _take(ctx.teacher_inputs, ids, ctx.device)
    plan = None
    if ctx.mix:
        plan = sample_mix(len(ids), mixup_alpha=kd.mixup_alpha, cutmix_alpha=kd.cutmix_alpha)
    if plan is not None:  # one plan for both: the teacher must see the student's mixed image
        x_s = {k: apply_mix(v, plan) for k, v in x_s.items()}
        x_t = None if x_t is None else {k: apply_mix(v, plan) for k, v in x_t.items()}
    with capture_features(ctx.student, fkd.student_names if fkd else []) as s_feats:
        student_logits = logits_of(ctx.model, x_s)  # (b, C)
    teacher_logits, t_feats = None, {}
    if cache is not None:
        got = cache.get(ids)
        teacher_logits = got["logits"].to(ctx.device)
        names = fkd.teacher_names if fkd else []
        t_feats = {n: got[FEATURE_PREFIX + n].to(ctx.device) for n in names}
    elif ctx.teacher is not None and x_t is not None:
        names = fkd.teacher_names if fkd else []
        with torch.no_grad(), capture_features(ctx.teacher.module, names, detach=True) as t_feats:
            teacher_logits = logits_of(ctx.teacher.module, x_t)
    t_float = None if teacher_logits is None else teacher_logits.float()
    mix: dict[str, Any] = {"kd_weight": kd.kd_weight, "kd_temperature": kd.kd_temperature}
    mix |= {"divergence": kd.divergence, "num_items": window_items}
    if plan is None:
        out = classifier_objective(student_logits.float(), t_float, y, **mix)
    else:
        soft = mixed_targets(y, y[plan.perm], plan.lam, student_logits.shape[-1])
        out = mixup_classifier_objective(student_logits.float(), t_float, soft, **mix)
    if fkd is not None:
        out = feature_objective(fkd.terms(s_feats, t_feats, window_items), out)
    return out


def train_phase(
    phase_name: str,
    s: Session,
    built: BuiltModel,
    cfg: Config,
    tcfg: TrainSection,
    data: tuple[Inputs, torch.Tensor, Inputs, torch.Tensor],
    log: MetricsLog,
    teacher: BuiltModel | None = None,
    teacher_inputs: Inputs | None = None,
    teacher_cache: ExampleCache | None = None,
    features: list[FeatureTerm] | None = None,
) -> None:
    """Train ``built.module`` in place: CE only, or CE + KD when a teacher is given.

    ``data`` is (train inputs, train labels, test inputs, test labels). With ``teacher_cache``,
    the teacher's logits (and feature maps) for each example are read from it (keyed by the
    example's index in the training split) instead of running the teacher.
    """
    inputs, labels, test_inputs, test_labels = data
    if (final := finished(s, phase_name)) is not None:  # finished before a crash: reuse it
        load_weights(built.module, final / "model.safetensors")
        logger.info("%s: reusing finished weights from %s", phase_name, final)
        return
    acc = s.accelerator
    fkd = None  # feature KD: projectors train with the student and are checkpointed, not exported
    if teacher is not None and teacher_inputs is not None and features:
        few = torch.arange(2)
        s_dev, t_dev = _device_of(built.module), _device_of(teacher.module)
        fkd = feature_distiller(
            features,
            built.module,
            teacher.module,
            lambda: logits_of(built.module, _take(inputs, few, s_dev)),
            lambda: logits_of(teacher.module, _take(teacher_inputs, few, t_dev)),
        )
    phase = open_phase(
        s,
        phase_name,
        model=built.module,
        extra=fkd,
        train=tcfg,
        num_examples=len(labels),
        seed=cfg.seed,
        log=log,
        config_key="teacher.training" if phase_name == "teacher" else "train",
    )
    if teacher is not None:
        teacher.module.to(acc.device).eval().requires_grad_(False)
    ctx = KDStep(
        model=phase.model,
        student=phase.unwrapped(),
        inputs=inputs,
        labels=labels,
        kd=cfg.kd,
        mix=phase_name != "teacher",
        device=acc.device,
        teacher=teacher,
        teacher_inputs=teacher_inputs,
        teacher_cache=teacher_cache,
        features=fkd,
    )
    for step in phase.steps():
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = kd_loss_step(ctx, ids, step.window_items)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))
        if step.ends_epoch and tcfg.eval_every_epoch:
            logits = metrics.predict_logits(phase.unwrapped(), test_inputs)
            phase.log_values(
                {"test_accuracy": metrics.accuracy(logits, test_labels), "epoch": step.epoch}
            )
    source = "cache" if teacher_cache else "live teacher" if teacher else "none"
    phase.finish(export=lambda folder: save_model(built, folder), summary={"kd_source": source})
    built.module = phase.unwrapped()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


FEATURE_PREFIX = "feature:"  # cached teacher feature maps are stored as feature:<module name>


def teacher_logits_cache(
    cfg: Config,
    s: Session,
    teacher: BuiltModel,
    inputs: Inputs,
    labels: torch.Tensor,
    features: list[FeatureTerm],
) -> ExampleCache:
    """Write (or complete, or reuse) the teacher's logits over the training split, plus the
    feature maps the feature terms read; open it.

    The cache is keyed by example index and fingerprinted by the teacher's weights, the encoded
    inputs and the feature names, so a cache of another teacher, other data or other features is
    refused by name, and a killed write resumes with only the missing shards.
    """
    assert cfg.teacher.cache is not None
    path = Path(cfg.teacher.cache)
    names = sorted({t.teacher for t in features})
    spec = {
        "teacher_fingerprint": teacher_fingerprint(teacher.module),
        "dataset_fingerprint": tensors_fingerprint({**inputs, "labels": labels}),
        "outputs": "classifier logits at temperature 1",
        "features": names,
    }
    acc = s.accelerator
    if acc.is_main_process:
        module = teacher.module.to(acc.device).eval()

        def compute(idx: list[int]) -> dict[str, torch.Tensor]:
            with capture_features(module, names, detach=True) as feats:
                logits = logits_of(module, _take(inputs, torch.tensor(idx), acc.device)).float()
            return {"logits": logits, **{FEATURE_PREFIX + n: feats[n] for n in names}}

        feature_dtype = getattr(torch, cfg.teacher.cache_feature_dtype)
        write_example_cache(
            path,
            example_ids=range(len(labels)),
            spec=spec,
            compute=compute,
            examples_per_shard=16384,
            dtypes={
                "logits": getattr(torch, cfg.teacher.cache_dtype),
                **{FEATURE_PREFIX + n: feature_dtype for n in names},
            },
            batch_size=cfg.eval.throughput_batch,
        )
    acc.wait_for_everyone()
    return ExampleCache(path, expect=spec)


def _now() -> float:
    import time

    return time.perf_counter()


def _cost(built: BuiltModel, inputs: Inputs, folder: Path, throughput_batch: int) -> dict[str, Any]:
    module = built.module.cpu().eval()
    one = {k: v[:1] for k, v in inputs.items()}
    many = {k: v[:throughput_batch] for k, v in inputs.items()}
    n_many = next(iter(many.values())).shape[0]
    with cpu_threads(1):  # comparable between runs on a busy machine (see cpu_threads)
        lat1 = cpu_latency_ms(lambda: logits_of(module, one))
        lat_many = cpu_latency_ms(lambda: logits_of(module, many), repeats=10)
    return {
        "params": count_parameters(module),
        "size_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "peak_memory_bytes": peak_forward_memory_bytes(lambda: logits_of(module, many), module),
        "latency_b1_ms": lat1,
        f"latency_b{n_many}_ms": lat_many,
        "throughput_per_s": n_many / (lat_many / 1e3),
        "throughput_batch": n_many,
    }


def feature_terms(
    cfg: Config, student: BuiltModel, teacher: BuiltModel, s_inputs: Inputs, t_inputs: Inputs
) -> list[FeatureTerm]:
    """The explicit ``kd.features`` plus, with ``kd.auto_features``, one term per block pair that
    the layer-map strategy picks over both models' blocks (shapes probed on two examples)."""
    terms = list(cfg.kd.features)
    auto = cfg.kd.auto_features
    if auto is None:
        return terms
    few = torch.arange(2)
    s_blocks, t_blocks = find_blocks(student.module), find_blocks(teacher.module)
    s_shapes = feature_shapes(
        student.module,
        s_blocks,
        lambda: logits_of(student.module, _take(s_inputs, few, torch.device("cpu"))),
    )
    t_shapes = feature_shapes(
        teacher.module,
        t_blocks,
        lambda: logits_of(teacher.module, _take(t_inputs, few, torch.device("cpu"))),
    )
    pairs = auto_layer_map(auto.layer_map, s_shapes, t_shapes, k=auto.k)
    return terms + [
        FeatureTerm(
            student=a,
            teacher=b,
            loss=auto.loss,
            weight=auto.weight,
            kd_temperature=auto.kd_temperature,
        )
        for a, b in pairs
    ]


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run the recipe in the session's run folder; return the report."""
    data = load_data(cfg)
    acc = s.accelerator
    torch.manual_seed(cfg.seed)
    teacher = build_classifier(**cfg.teacher.model.model_dump(), data=data)
    if (
        cfg.teacher.model.zoo is not None
        and not cfg.teacher.train
        and cfg.teacher.checkpoint is None
    ):
        raise DistilError(
            "the zoo teacher has no weights: set teacher.checkpoint: PATH.safetensors, or teacher.train: true"
        )
    if cfg.teacher.checkpoint is not None:
        load_weights(teacher.module, Path(cfg.teacher.checkpoint))
    t_train, t_test = teacher.encoder(data.train), teacher.encoder(data.test)
    _check_classes(teacher, t_train, data.num_classes, "teacher")
    train_labels, test_labels = (
        torch.from_numpy(data.train.labels),
        torch.from_numpy(data.test.labels),
    )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    s.announce(
        f"classifier_kd on {data.name} ({len(data.train)} train / {len(data.test)} test, {data.num_classes} classes): "
        f"teacher {teacher.source} ({'trained here' if cfg.teacher.train else 'loaded'}), student {cfg.student.model.zoo or cfg.student.model.hf or cfg.student.model.factory}, "
        f"loss = {1 - cfg.kd.kd_weight:g}·CE + {cfg.kd.kd_weight:g}·T²·{cfg.kd.divergence} at kd_temperature={cfg.kd.kd_temperature:g}; "
        f"{acc.num_processes} process(es) on {acc.device}"
        + (f"; teacher logits cached in {cfg.teacher.cache}" if cfg.teacher.cache else "")
    )
    if cfg.teacher.train:
        t_data = (t_train, train_labels, t_test, test_labels)
        train_phase("teacher", s, teacher, cfg, cfg.teacher.training, t_data, log)
    teacher.module.eval().requires_grad_(False)

    def fresh_student() -> BuiltModel:
        torch.manual_seed(
            cfg.seed + 17
        )  # the same initial weights for the KD student and the baseline
        built = build_classifier(**cfg.student.model.model_dump(), data=data)
        return built

    student = fresh_student()
    s_train, s_test = student.encoder(data.train), student.encoder(data.test)
    _check_classes(student, s_train, data.num_classes, "student")
    features = feature_terms(cfg, student, teacher, s_train, t_train)
    if cfg.kd.auto_features is not None and acc.is_main_process:
        pairs = ", ".join(f"{t.student} -> {t.teacher}" for t in features[len(cfg.kd.features) :])
        s.announce(
            f"classifier_kd: automatic feature terms ({cfg.kd.auto_features.layer_map.value}, {cfg.kd.auto_features.loss.value}): {pairs}"
        )
    cache = None
    if cfg.teacher.cache is not None:
        t0 = _now()
        cache = teacher_logits_cache(cfg, s, teacher, t_train, train_labels, features)
        if acc.is_main_process:
            s.write_json(
                s.run_dir / "teacher-cache.json",
                {
                    "path": str(cache.path),
                    "seconds": _now() - t0,
                    "bytes_per_example": cache.manifest["bytes_per_example"],
                },
            )
    s_data = (s_train, train_labels, s_test, test_labels)
    train_phase(
        "student", s, student, cfg, cfg.train, s_data, log, teacher, t_train, cache, features
    )
    baseline = None
    if cfg.eval.baseline:
        baseline = fresh_student()
        train_phase("baseline", s, baseline, cfg, cfg.train, s_data, log)
    if not acc.is_main_process:
        return {}
    report = build_report(cfg, s, data, teacher, student, baseline, t_test, s_test, test_labels)
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report


def build_report(
    cfg: Config,
    s: Session,
    data: ClassificationData,
    teacher: BuiltModel,
    student: BuiltModel,
    baseline: BuiltModel | None,
    t_test: Inputs,
    s_test: Inputs,
    test_labels: torch.Tensor,
) -> dict[str, Any]:
    teacher_dir = s.run_dir / "teacher" / "final"
    if not teacher_dir.is_dir():
        save_model(teacher, teacher_dir)
    t_logits = metrics.predict_logits(teacher.module, t_test)
    rows: list[dict[str, Any]] = []
    roles = [("teacher", teacher, t_test), ("student (KD)", student, s_test)]
    if baseline is not None:
        roles.append(("baseline (no teacher)", baseline, s_test))
    saved: dict[str, torch.Tensor] = {"labels": test_labels}
    for role, built, inp in roles:
        logits = t_logits if built is teacher else metrics.predict_logits(built.module, inp)
        saved[role.split(" ")[0]] = logits.contiguous()
        folder = (
            s.run_dir
            / {
                "teacher": "teacher",
                "student (KD)": "student",
                "baseline (no teacher)": "baseline",
            }[role]
            / "final"
        )
        row = {
            "model": role,
            "source": built.source,
            "accuracy": metrics.accuracy(logits, test_labels),
            "agreement": metrics.agreement(logits, t_logits),
            **_cost(built, inp, folder, cfg.eval.throughput_batch),
        }
        row["per_class_accuracy"] = metrics.per_class_accuracy(
            logits, test_labels, data.num_classes
        )
        rows.append(row)
    from safetensors.torch import save_file

    (s.run_dir / "eval").mkdir(exist_ok=True)
    save_file(
        saved, str(s.run_dir / "eval" / "test_logits.safetensors")
    )  # for calibration/confusion in reports
    for row in rows:
        row["speedup"] = rows[0]["latency_b1_ms"] / row["latency_b1_ms"]
        row["size_ratio"] = rows[0]["params"] / row["params"]
    highlights: dict[str, Any] = {"dataset": f"{data.name} ({len(data.test)} test examples)"}
    if baseline is not None:
        gain = rows[1]["accuracy"] - rows[2]["accuracy"]
        gap = rows[0]["accuracy"] - rows[2]["accuracy"]
        highlights["KD gain over baseline (accuracy points)"] = 100 * gain
        highlights["gap closed (student - baseline) / (teacher - baseline)"] = (
            gain / gap if gap > 0 else None
        )
    highlights["student is smaller by"] = (
        f"{rows[1]['size_ratio']:.1f}x params, {rows[1]['speedup']:.1f}x faster at batch 1"
    )
    columns = [
        ("model", "model"),
        ("accuracy", "test acc"),
        ("agreement", "agree w/ teacher"),
        ("params", "params"),
        ("size_bytes", "bytes"),
        ("latency_b1_ms", "ms @ b1"),
        ("throughput_per_s", f"ex/s @ b{rows[0]['throughput_batch']}"),
        ("speedup", "speed-up"),
    ]
    role_names = {"teacher": rows[0]["model"], "student": rows[1]["model"]}
    if baseline is not None:
        role_names["baseline"] = rows[2]["model"]
    for row in rows:
        known = [a for a in row["per_class_accuracy"] if a is not None]
        row["mean_class_accuracy"] = sum(known) / len(known) if known else None
    batch = rows[0]["throughput_batch"]
    return {
        "title": f"classifier_kd: {data.name}",
        "recipe": "classifier_kd",
        "roles": role_names,
        "table": {"columns": [{"key": k, "label": lbl} for k, lbl in columns], "rows": rows},
        "highlights": highlights,
        "quality": quality_part(
            rows,
            [("accuracy", "test accuracy"), ("mean_class_accuracy", "mean per-class accuracy")],
            roles=role_names,
            primary="accuracy",
            per_class={
                "labels": data.class_names,
                "metric": "accuracy",
                "values": {r["model"]: r["per_class_accuracy"] for r in rows},
            },
        ),
        "fidelity": fidelity_part(
            {k: saved[k] for k in ("teacher", "student", "baseline") if k in saved},
            test_labels,
            names=role_names,
            split=f"test split ({len(test_labels)} examples)",
            class_names=data.class_names,
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_ratio", "teacher/model params"),
                ("size_bytes", "on disk"),
                ("peak_memory_bytes", f"peak memory @ b{batch}"),
                ("latency_b1_ms", "CPU ms @ b1 (1 thread)"),
                (f"latency_b{batch}_ms", f"CPU ms @ b{batch} (1 thread)"),
                ("throughput_per_s", f"ex/s @ b{batch}"),
                ("speedup", "speed-up @ b1"),
            ],
        ),
        "details": {
            "kd": cfg.kd.model_dump(),
            "seed": cfg.seed,
            "class_names": data.class_names,
            "processes": s.accelerator.num_processes,
        },
    }
