"""Study specs: a YAML file validated once into frozen, typed objects that refuse typos.

`load_spec(path)` returns a `StudySpec` or raises `SpecError` listing every problem as "field.path: what is
wrong (what is allowed)". Validation creates nothing: no directory, no MLflow experiment, no Ray.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.data import dataset_names
from trainables.models import VARIANTS, create_model, model_config
from trainables.models.factory import SKIP_VARIANTS, split_variant
from trainables.models.vgg import VGG_CONFIGS
from trainables.stages.procedure import KINDS, StageSettings, placement_levels, procedure


class SpecError(ValueError):
    """A spec that cannot run; `problems` holds one message per problem."""

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]

# What a study may sweep, besides `model` (a choice of variants) and `loss.weights.<level>`.
STAGE_PARAMS = ("epochs", "batch_size", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay")
DATASET_SHAPES = {  # (in_channels, num_classes, image_size) known before any file is read
    "fashion_mnist": (1, 10, 28), "cifar10": (3, 10, 32), "cifar100": (3, 100, 32), "imagefolder": (3, 1000, 224),
}


class DataSpec(Strict):
    dataset: str = "fashion_mnist"  # one of trainables.data.dataset_names()
    root: str | None = None  # directory of the files; None = the dataset's default location
    subset: Annotated[int, Field(ge=2)] | None = None  # training examples used (before the val split); None = all
    val_size: int | float = 0.1  # held-out validation examples: a count, or a fraction of the training files
    labeled_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0  # share of training examples that keep labels
    augment: bool = False  # random crop (pad 4) + flip on the training split (CIFAR-style)
    # "val" = the held-out split; "test" = the official test split. A search selects on the held-out split either
    # way; with "test" its selected configurations (each model's best) are then evaluated on the test split.
    eval_on: Literal["val", "test"] = "val"
    crop: Annotated[int, Field(ge=32)] | None = None  # imagefolder: input side in pixels (None = 224; resize 256/224 x crop)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v):
        if v not in dataset_names():
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(dataset_names())}")
        return v


class ModelSpec(Strict):
    encoder: str = "vgg_small"  # VGG configuration of the classifier: vgg16 | vgg_small | vgg_tiny
    blocks: list[list[Annotated[int, Field(ge=1)]]] | None = None  # override: conv widths per macro-layer
    fc: list[Annotated[int, Field(ge=1)]] | None = None  # override: hidden widths of the head
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None  # override: head dropout
    unpool_offset: tuple[int, int] = (1, 1)  # SAE switch position in each 2x2 window
    pretrained: str | None = None  # vgg16 only: torchvision weights name or a local .pth path
    skip: dict[str, Any] = {}  # skip autoencoder settings (depth, width, downsample_every, skip_every, noise, noise_level)

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, v):
        if v not in VGG_CONFIGS:
            raise ValueError(f"unknown encoder {v!r}; known: {', '.join(VGG_CONFIGS)} (skip autoencoder models "
                             "use their own encoder, configured under model.skip)")
        return v


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam"] = "sgd"
    # base learning rate, or "auto" (layerwise/topdown stages): the paper's selection, per decoder block the rate of
    # lr_grid with the largest loss drop after probe_steps steps (chosen rates recorded as lr_decoder<k>)
    lr: PositiveFloat | Literal["auto"] = 0.01
    lr_grid: list[PositiveFloat] = []  # lr auto: rates probed
    probe_steps: Annotated[int, Field(ge=1)] = 200  # lr auto: steps per probe (the paper: 2000 iterations)
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # SGD momentum
    weight_decay: NonNegativeFloat = 0.0  # L2 penalty
    group_lrs: dict[str, PositiveFloat] = {}  # per parameter-group learning rates, e.g. {decoder1: 0.001}
    # constant: the rates as given | cosine: every rate annealed per step from its base value to 0 over the stage
    schedule: Literal["constant", "cosine"] = "constant"


class StageSpec(Strict):
    epochs: Annotated[int, Field(ge=0)] = 1  # passes over the training split (0: only load/evaluate)
    batch_size: Annotated[int, Field(ge=1)] = 128  # examples per step over all workers
    optimizer: OptimizerSpec = OptimizerSpec()


class LossSpec(Strict):
    weights: dict[str, NonNegativeFloat] = {}  # per-level weights in the fine-tuning loss; missing = paper's default
    form: Literal["euclidean", "mse"] = "euclidean"  # euclidean = sum of squares / (2 x batch), the released code
    detach_targets: bool = False  # stop gradients into reconstruction targets (the paper does not)
    decoder_form: Literal["euclidean", "mse"] = "mse"  # loss form while decoders train alone (stages 2, 3)
    # fixed: `weights` (or the paper's) as given | auto: each level's fine-tuning weight set from the terms measured
    # on the first balance_batches batches so that it carries target_share of the total loss (trainables/stages/balance.py)
    balance: Literal["fixed", "auto"] = "fixed"
    target_share: Annotated[float, Field(gt=0, lt=1)] | dict[str, Annotated[float, Field(gt=0, lt=1)]] = 0.1  # per level
    balance_batches: Annotated[int, Field(ge=1)] = 4  # batches measured for balance auto

    @field_validator("weights")
    @classmethod
    def _level_names(cls, v):
        for level in v:
            if not re.fullmatch(r"image|pool[1-9][0-9]*", level):
                raise ValueError(f"unknown level {level!r}: levels are 'image', 'pool1', 'pool2', ...")
        return v


class ResourcesSpec(Strict):
    workers: Annotated[int, Field(ge=1)] = 1  # data-parallel Ray Train workers per stage (DDP when > 1)
    cpus_per_worker: PositiveFloat = 1.0  # cores per worker: also the worker's torch thread count
    gpus_per_worker: NonNegativeFloat = 0.0  # > 0 trains on CUDA
    # auto = bf16 autocast where the workers' device runs bfloat16 natively (CUDA compute capability >= 8.0, CPUs
    # with AVX512_BF16 or AMX), fp32 elsewhere. The resolved precision enters every stage's key.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"  # NHWC convolutions; auto = where measured faster (CUDA, x86)
    max_failures: Annotated[int, Field(ge=0)] = 2  # worker failures a stage recovers from
    deterministic: bool = False  # torch deterministic algorithms (bitwise repeatable GPU runs, slower; docs/TRAINING.md)
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # trials at once; None = as many as the resources fit
    # per_trial: each trial runs its missing stages as a Train run of its own (~15 CPU-s of Ray Train start-up each);
    # pooled: one long-lived Train run per trial slot runs every trial's stages (small stages; docs/TRAINING.md).
    train_runs: Literal["per_trial", "pooled"] = "per_trial"

    @model_validator(mode="before")
    @classmethod
    def _amp_replaced(cls, data):
        if isinstance(data, dict) and "amp" in data:
            raise ValueError("'amp' was replaced by 'precision: auto | fp32 | bf16' (amp: true -> precision: bf16; "
                             "auto picks bf16 where the hardware runs it natively)")
        return data


class Distribution(Strict):
    type: Literal["uniform", "loguniform", "int", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _well_formed(self):
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} distribution needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("a loguniform distribution needs low > 0")
        return self


class SchedulerSpec(Strict):
    type: Literal["asha"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1  # fine-tuning epochs before a trial can be stopped
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0


class SearchSpec(Strict):
    algorithm: Literal["optuna", "grid"] = "optuna"  # optuna: TPE over distributions; grid: every combination
    num_samples: Annotated[int, Field(ge=1)] = 10  # optuna trials (grid: repeats of the grid)
    sampler_seed: int = 0  # TPE's seed: the same spec samples the same configs
    space: dict[str, Distribution] = {}  # parameter path -> distribution (see STAGE_PARAMS, loss.weights.<level>, model)
    scheduler: SchedulerSpec | None = None  # early stopping on the fine-tuning stage


class ObjectiveSpec(Strict):
    metric: Literal["val_top1_err", "val_top5_err", "train_top1_err"] = "val_top1_err"  # of the final stage; minimised


class StudySpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]  # also the directory name
    description: str = ""
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    models: list[str] = ["baseline"]  # variants compared (trials: models x seeds, or a search)
    baseline: str = "baseline"  # the reference model of the analysis
    seeds: list[int] = [0]  # every configuration runs once per seed
    stages: dict[str, StageSpec] = {}  # per stage kind: classifier | layerwise | topdown | finetune | pretrain
    loss: LossSpec = LossSpec()
    resources: ResourcesSpec = ResourcesSpec()
    search: SearchSpec | None = None
    objective: ObjectiveSpec = ObjectiveSpec()
    results_dir: str = "runs"  # where the study's directory is created (relative to the working directory)
    store: str | None = None  # stage store URI (any pyarrow filesystem); None = <storage>/store, shared by studies
    storage: str | None = None  # URI every node reaches (s3://, gs://, shared mount): Tune, Train, store, artifacts
    system_metrics: bool = False  # opt-in: MLflow samples the launcher node's CPU/memory/disk/GPU on the study run

    @field_validator("models")
    @classmethod
    def _known_models(cls, v):
        bad = [m for m in v if m not in VARIANTS]
        if bad:
            hints = {m: difflib.get_close_matches(m, VARIANTS, 1) for m in bad}
            raise ValueError("unknown model(s) " + ", ".join(
                f"{m!r}" + (f" (did you mean {hints[m][0]!r}?)" if hints[m] else "") for m in bad
            ) + f"; known: {', '.join(VARIANTS)}")
        if not v:
            raise ValueError("at least one model is needed")
        if len(set(v)) != len(v):
            raise ValueError("a model is listed twice")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return v

    @field_validator("stages")
    @classmethod
    def _kinds(cls, v):
        bad = [k for k in v if k not in KINDS]
        if bad:
            raise ValueError(f"unknown stage kind(s) {bad}; known: {', '.join(KINDS)}")
        return v

    # -- cross-field checks: each adds its own message -------------------------------------------------------
    def problems(self) -> list[str]:
        out: list[str] = []
        variants = self.candidate_models()
        if self.baseline not in variants and self.baseline not in VARIANTS:
            out.append(f"baseline: unknown model {self.baseline!r}")
        for variant in variants:
            for kind in needed_kinds(variant):
                if kind not in self.stages:
                    out.append(f"stages.{kind}: missing, but model {variant!r} needs it (give epochs, batch_size, optimizer)")
        out += self._model_problems(variants)
        out += self._stage_problems()
        out += self._loss_problems(variants)
        if self.search is not None:
            out += self._search_problems(variants)
        if self.data.crop is not None and self.data.dataset != "imagefolder":
            out.append(f"data.crop: only imagefolder images are resized and cropped (dataset is {self.data.dataset!r})")
        if isinstance(self.data.val_size, float) and not 0 <= self.data.val_size < 1:
            out.append(f"data.val_size: a fraction must be in [0, 1), got {self.data.val_size}")
        if (self.data.subset is not None and isinstance(self.data.val_size, int) and self.data.dataset != "imagefolder"
                and self.data.val_size >= self.data.subset):  # imagefolder validates on val/, not a hold-out
            out.append(f"data.val_size: {self.data.val_size} held out of a subset of {self.data.subset} leaves no training data")
        return out

    def candidate_models(self) -> list[str]:
        """Every variant a trial may run: `models`, plus a search's `model` choices."""
        found = list(self.models)
        if self.search and "model" in self.search.space:
            found += [m for m in self.search.space["model"].values or [] if m not in found]
        return found

    def _model_problems(self, variants: list[str]) -> list[str]:
        out = []
        channels, classes, size = DATASET_SHAPES.get(self.data.dataset, (3, 10, 32))
        size = self.data.crop or size
        for variant in variants:
            if variant not in VARIANTS:
                continue
            try:
                with torch.device("meta"):  # build without allocating: cheap, and catches impossible shapes
                    create_model(resolved_model_dict(self.model, variant, channels, classes, size) | {"pretrained": None})
            except (ValueError, TypeError) as exc:
                out.append(f"model: {variant!r} cannot be built: {exc}")
        return out

    def _stage_problems(self) -> list[str]:
        out = []
        workers = self.resources.workers
        for kind, stage in self.stages.items():
            where = f"stages.{kind}"
            if workers > 1 and stage.batch_size % workers:
                out.append(f"{where}.batch_size: {stage.batch_size} is not a multiple of resources.workers={workers} "
                           "(the global batch is split evenly between the workers)")
            opt = stage.optimizer
            if opt.lr == "auto" and kind not in ("layerwise", "topdown"):
                out.append(f"{where}.optimizer.lr: 'auto' (the paper's decoder-rate probes) is for the layerwise and "
                           "topdown stages only")
            if opt.lr == "auto" and not opt.lr_grid:
                out.append(f"{where}.optimizer.lr_grid: lr 'auto' needs the rates to probe, e.g. [0.001, 0.01, 0.1]")
            if opt.lr_grid and opt.lr != "auto":
                out.append(f"{where}.optimizer.lr_grid: only used with lr 'auto' (lr is {opt.lr})")
        return out

    def _loss_problems(self, variants: list[str]) -> list[str]:
        levels = set()
        for variant in variants:
            levels |= set(model_levels(self.model, variant))
        out = []
        extra = sorted(set(self.loss.weights) - levels)
        if extra:
            out.append(f"loss.weights: level(s) {extra} exist in none of the models {variants} (their levels: {sorted(levels)})")
        if self.loss.balance == "auto":
            if self.loss.weights:
                out.append("loss.weights: balance 'auto' sets the weights itself; remove loss.weights or use balance fixed")
            if self.search and any(p.startswith("loss.weights.") for p in self.search.space):
                out.append("search.space: loss.weights.<level> cannot be searched with loss.balance 'auto' "
                           "(search loss.target_share instead by running one study per share)")
            shares = self.loss.target_share
            for variant in variants:
                lv = model_levels(self.model, variant)
                if isinstance(shares, dict):
                    missing = [lvl for lvl in lv if lvl not in shares]
                    if missing:
                        out.append(f"loss.target_share: no share for level(s) {missing} of model {variant!r}")
                        continue
                total = sum(shares[lvl] if isinstance(shares, dict) else shares for lvl in lv)
                if total >= 1:
                    out.append(f"loss.target_share: the shares of model {variant!r} sum to {total:g} >= 1 "
                               "(cross-entropy keeps the rest)")
        elif self.loss.target_share != 0.1 or self.loss.balance_batches != 4:
            out.append("loss.target_share / loss.balance_batches: only used with loss.balance 'auto'")
        return out

    def _search_problems(self, variants: list[str]) -> list[str]:
        out = []
        s = self.search
        if not s.space:
            out.append("search.space: empty; give at least one parameter to search, or remove `search`")
        for path, dist in s.space.items():
            where = f"search.space.{path}"
            if path == "model":
                if dist.type not in ("choice", "grid"):
                    out.append(f"{where}: the model is a choice (type choice or grid), not {dist.type}")
                bad = [m for m in dist.values or [] if m not in VARIANTS]
                if bad:
                    out.append(f"{where}: unknown model(s) {bad}; known: {', '.join(VARIANTS)}")
            elif path.startswith("loss.weights."):
                level = path.removeprefix("loss.weights.")
                having = [v for v in variants if level in model_levels(self.model, v)]
                if not having:
                    out.append(f"{where}: no model of this study has level {level!r} "
                               f"(models: {variants}; 'first' models reconstruct the image only, the baseline nothing)")
                if dist.type in ("uniform", "loguniform") and dist.low is not None and dist.low < 0:
                    out.append(f"{where}: a loss weight cannot be negative (low={dist.low})")
                if dist.type in ("choice", "grid") and any(not isinstance(x, (int, float)) or x < 0 for x in dist.values or []):
                    out.append(f"{where}: loss weights must be numbers >= 0")
            elif path.startswith("stages."):
                parts = path.split(".", 2)
                if len(parts) < 3 or parts[1] not in KINDS or parts[2] not in STAGE_PARAMS:
                    out.append(f"{where}: unknown parameter; searchable: stages.<kind>.<{'|'.join(STAGE_PARAMS)}> "
                               f"with kind in {', '.join(KINDS)}")
                elif parts[1] not in {k for v in variants for k in needed_kinds(v)}:
                    out.append(f"{where}: no model of this study has a {parts[1]!r} stage")
            else:
                close = difflib.get_close_matches(path, ["model", "loss.weights.image", "stages.finetune.optimizer.lr"], 1)
                out.append(f"{where}: unknown parameter" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + "; searchable: model, loss.weights.<level>, stages.<kind>.<param>")
        if s.algorithm == "grid" and any(d.type not in ("choice", "grid") for d in s.space.values()):
            out.append("search.algorithm: grid needs every space entry to be of type grid or choice")
        if self.data.eval_on == "test" and self.data.dataset != "imagefolder" and not self.data.val_size:
            out.append("data.val_size: 0 leaves a search nothing to select on (it selects on the held-out "
                       "validation split, and evaluates only the selected configurations on the test split); "
                       "give val_size a count or a fraction")
        if s.scheduler is not None and len(self.seeds) > 1:
            out.append("search.scheduler: ASHA stops trials on one fine-tuning curve; use a single seed with it")
        if s.scheduler is not None and s.algorithm == "grid":
            out.append("search.scheduler: early stopping goes with algorithm optuna, not grid")
        return out


def needed_kinds(variant: str) -> list[str]:
    """Stage kinds a variant's procedure uses (read off the procedure itself, so the two cannot disagree)."""
    if variant not in VARIANTS:
        return []
    shape = DATASET_SHAPES["fashion_mnist"]
    model = model_config(resolved_model_dict(ModelSpec(encoder="vgg_tiny"), variant, *shape))
    return [stage.kind for stage in procedure(model, {kind: StageSettings() for kind in KINDS})]


def model_levels(model: ModelSpec, variant: str) -> list[str]:
    """Levels with a reconstruction loss in a variant's fine-tuning stage."""
    if variant not in VARIANTS:
        return []
    decoder, placement = split_variant(variant)
    if decoder in ("none", "skip"):
        return []
    depth = len(model.blocks or VGG_CONFIGS[model.encoder].blocks)
    return placement_levels(placement, depth)


def resolved_model_dict(model: ModelSpec, variant: str, in_channels: int, num_classes: int, image_size: int) -> dict:
    """The ModelConfig dict of one variant: skip autoencoder variants get their own encoder."""
    is_skip = variant in SKIP_VARIANTS
    return {
        "variant": variant,
        "encoder": "skipae" if is_skip else model.encoder,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": image_size,
        "blocks": None if is_skip else model.blocks,
        "fc": None if is_skip else model.fc,
        "dropout": None if is_skip else model.dropout,
        "unpool_offset": list(model.unpool_offset),
        "pretrained": None if is_skip else model.pretrained,
        "skip": dict(model.skip) if is_skip else {},
    }


def _format(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc or '(top level)'}: {msg}"


def _unknown_key_hint(problem: str, data: dict) -> str:
    """Add 'did you mean' to unknown-key messages."""
    if not problem.endswith("unknown key"):
        return problem
    path = problem.split(":")[0].split(".")
    model_cls: type[BaseModel] = StudySpec
    for part in path[:-1]:
        field = model_cls.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return problem
        model_cls = candidates[0]
    close = difflib.get_close_matches(path[-1], list(model_cls.model_fields), 1)
    allowed = ", ".join(model_cls.model_fields)
    return problem + (f" (did you mean {close[0]!r}?)" if close else "") + f"; allowed: {allowed}"


def parse_spec(data: Any, source: str = "spec") -> StudySpec:
    """Validate a parsed YAML document; every problem is reported at once."""
    if not isinstance(data, dict):
        raise SpecError([f"(top level): a study spec is a mapping of fields, got {type(data).__name__}"], source)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_unknown_key_hint(_format(e), data) for e in exc.errors()], source) from None
    problems = spec.problems()
    if problems:
        raise SpecError(problems, source)
    return spec


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's rule, enforced: a key appears once per mapping (PyYAML would keep the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise SpecError([f"{key}: duplicate key (lines {seen[key]} and {line}); YAML keeps only the last "
                                 "value, so remove or rename one"], self.name)
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_spec(path: str | Path, overrides: list[str] = (), smoke: bool = False) -> dict:
    """The spec document of `path` with `--set path=value` overrides (values in YAML) and the smoke reduction."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"no such spec file: {path}"], str(path))
    try:
        loader = _UniqueKeyLoader(path.read_text())
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(data, dict):
        raise SpecError([f"(top level): a study spec is a mapping of fields, got {type(data).__name__}"], str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError([f"--set {item!r}: expected path=value, e.g. data.subset=2000"], str(path))
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise SpecError([f"--set {item!r}: {p!r} is not a mapping"], str(path))
        target[leaf] = yaml.safe_load(value)
    return smoke_reduction(data) if smoke else data


def smoke_reduction(data: dict) -> dict:
    """The same study at toy size, for a run of seconds: what CI runs for every shipped spec.

    Same models, stage kinds, search space and placements; tiny encoder, ~200 images, 1 epoch per stage,
    one seed, 2 search samples, rate probes of 2 steps over 2 rates, CPU; a separate name (`<name>-smoke`) so it
    never mixes with the real study. A VGG16 with a local `.pth` state dict stays, on 32x32 crops.
    """
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    out["name"] = f"{out.get('name', 'study')}-smoke"
    d = out.setdefault("data", {})
    d["subset"], d["val_size"] = min(int(d.get("subset") or 200), 200), 50
    m = out.setdefault("model", {})
    if str(m.get("pretrained") or "").endswith((".pth", ".pt")):
        # A local VGG16 state dict stays (its loading, input scale and dense evaluation are what such a spec is
        # about); small images keep it cheap. Named torchvision weights would need a download: tiny encoder instead.
        d["crop"] = 32
    elif m.get("encoder", "vgg_small") != "vgg_tiny":
        m.update(encoder="vgg_tiny", blocks=None, fc=None, pretrained=None)
        out.setdefault("loss", {})["weights"] = {k: v for k, v in (out.get("loss", {}).get("weights") or {}).items()
                                                 if k in ("image", "pool1")}
    if m.get("skip"):
        m["skip"] = {**m["skip"], "depth": 2, "width": 8}
    for stage in (out.get("stages") or {}).values():
        if isinstance(stage, dict):
            stage["epochs"] = min(int(stage.get("epochs", 1)), 1)
            stage["batch_size"] = min(int(stage.get("batch_size", 128)), 64)
            optimizer = stage.get("optimizer")
            if isinstance(optimizer, dict) and optimizer.get("lr") == "auto":
                optimizer["lr_grid"] = list(optimizer.get("lr_grid") or [])[:2]
                optimizer["probe_steps"] = 2
    out["seeds"] = (out.get("seeds") or [0])[:1]
    if out.get("search"):
        out["search"]["num_samples"] = min(int(out["search"].get("num_samples", 2)), 2)
        space = out["search"].get("space") or {}
        out["search"]["space"] = {k: v for k, v in space.items()
                                  if not k.startswith("loss.weights.") or k.split(".")[-1] in ("image", "pool1")}
    out["resources"] = {"workers": 1, "cpus_per_worker": 1}
    return out


def load_spec(path: str | Path, overrides: list[str] = (), smoke: bool = False) -> StudySpec:
    """Read, override, reduce (smoke) and validate a spec file."""
    return parse_spec(read_spec(path, overrides, smoke), str(path))

