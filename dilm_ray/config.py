"""Typed, validated configuration: YAML defaults plus dotted command-line overrides.

Every section is a frozen pydantic model with ``extra="forbid"``, so unknown keys, wrong
types and out-of-range values are refused with one line naming the key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from dilm_ray import precision as _precision
from dilm_ray.errors import UserError
from dilm_ray.families import LEARNER_KINDS
from dilm_ray.methods import BASELINES


# Keys that no longer exist, with why: refused with that reason rather than as unknown.
REMOVED_KEYS = {"distill.repset_pool": "it was never read (remove it from the config)"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Section):
    task: str = Field("sst2", description="built-in task (sst2, mnli, qqp) or any name for a custom dataset")
    path: str | None = Field(None, description="local folder of parquet/csv/jsonl split files; None loads nyu-mll/glue from the hub")
    text_columns: list[str] | None = Field(None, min_length=1, max_length=2, description="custom tasks: 1 or 2 text columns")
    label_column: str = "label"
    label_names: list[str] | None = Field(None, min_length=2, description="custom tasks: names of the labels, index = label id")
    train_split: str = "train"
    validation_split: str | None = Field(None, description="defaults to the task's (validation_matched for MNLI)")
    max_train_samples: int | None = Field(None, ge=1)
    max_validation_samples: int | None = Field(None, ge=1)
    balanced: bool = Field(False, description="subsample the same number of rows per label")
    dev_samples: int | None = Field(
        None, ge=1, description="report on this many held-out train rows (outside max_train_samples) instead of the validation split: choose settings here, confirm on validation"
    )
    seed: int = 0


class GeneratorConfig(_Section):
    model: str = "gpt2"
    max_length: int = Field(64, ge=4, le=4096, description="tokens per sample, prompt (sink and label token) and EOS included")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=1, description="pre-filter before top-p; keeps sampling fast")
    temperature: float = Field(1.0, gt=0.0)
    train_top_layers: int | None = Field(None, ge=1, description="train only the top N transformer layers (CPU budgets)")
    generate_batch_size: int = Field(64, ge=1)
    label_init: Literal["label_name", "bos"] = Field(
        "label_name", description="initial <bos_i> embedding: the mean embedding of label i's name, or a copy of BOS"
    )
    sink_token: bool = Field(
        True, description="start each sample with the LM's own BOS so <bos_i> is not position 0, the attention sink"
    )
    lora_rank: int | None = Field(
        None, ge=1, description="stages 1-2 train rank-r LoRA adapters (PEFT) on every linear layer instead of whole blocks; needs train_top_layers: null"
    )
    lora_alpha: float | None = Field(None, gt=0.0, description="LoRA scale numerator (scale alpha / rank); None: 2 x lora_rank")
    packing: bool = Field(
        True,
        description="LM losses (stages 1-2) run on the samples packed into rows of max_length, without padding: the same losses "
        "up to float rounding, 1.7x the real tokens/s on SST-2 batches of 16 (benchmarks/README.md); false: right-padded batches",
    )
    constrained_decoding: Literal["fallback", "always"] = Field(
        "fallback",
        description="fallback: sample freely, regenerate malformed samples, decode under the task's format what is missing after "
        "the rounds (synthesize.max_attempts; 10 in stage 2), or after the first round when it keeps under half; "
        "always: decode every sample under it (well-formed by construction)",
    )

    @model_validator(mode="after")
    def _lora_or_top_layers(self) -> GeneratorConfig:
        if self.lora_rank is not None and self.train_top_layers is not None:
            raise ValueError(
                f"generator.lora_rank={self.lora_rank} adapts every layer: set generator.train_top_layers to null "
                f"(it is {self.train_top_layers})"
            )
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("generator.lora_alpha is set but generator.lora_rank is not")
        return self


class LearnerConfig(_Section):
    model: str = "bert-base-uncased"
    max_length: int = Field(128, ge=8, le=4096)
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    embed_batch_size: int = Field(64, ge=1)


class PretrainConfig(_Section):
    steps: int = Field(20000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = Field(1.0, gt=0.0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(1000, ge=1)


class DistillConfig(_Section):
    steps: int = Field(20000, ge=1, description="generator updates in stage 2 (outer loops x inner_loop)")
    inner_loop: int = Field(10, ge=1, description="matching steps per learner re-initialisation")
    learner_steps: int = Field(20, ge=0, description="learner updates on real data between matching steps")
    learner_batch_size: int = Field(64, ge=1)
    learner_lr: float = Field(1e-4, gt=0.0)
    lr: float = Field(3e-7, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    n_repset: int = Field(10, ge=1, description="representative teacher sets")
    repset_dpc: int = Field(200, ge=1, description="real samples per class in each teacher set (K-means clusters)")
    gm_real_dpc: int = Field(100, ge=1, description="real samples per class per matching batch")
    gm_real_accum: int = Field(2, ge=1, description="real batches averaged into one real gradient")
    gm_syn_dpc: int = Field(64, ge=1, description="synthetic samples per class per step = K-means clusters of the pool")
    generate_interval: int = Field(20, ge=1, description="outer loops between synthetic pool regenerations")
    temperature: float = Field(1.0, gt=0.0, description="T in softmax(-gen_loss / T)")
    lm_lambda: float = Field(0.0, ge=0.0, le=1.0, description="weight of the LM loss mixed into the matching loss")
    lm_batch_size: int = Field(64, ge=1)
    grad: Literal["head", "full"] = Field("head", description="learner gradient matched: classifier head or all parameters")
    label_filter: bool = Field(
        False,
        description="beyond the paper: match only generated samples the label filter's reference classifier finds consistent with their label",
    )
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _steps_multiple_of_inner_loop(self) -> DistillConfig:
        if self.steps % self.inner_loop:
            raise ValueError(f"distill.steps={self.steps} must be a multiple of distill.inner_loop={self.inner_loop}")
        return self


class SynthesizeConfig(_Section):
    dpc: list[int] = Field([5, 10, 20], min_length=1, description="data per class of each distilled set")
    over_sample_ratio: int = Field(10, ge=1, description="generate dpc x ratio per class, keep dpc by K-centers")
    n_datasets: int = Field(20, ge=1)
    select: Literal["k_centers", "random"] = "k_centers"
    max_attempts: int = Field(10, ge=1, description="rounds of regeneration for malformed samples, then as many under the task's format")

    @model_validator(mode="after")
    def _positive_dpc(self) -> SynthesizeConfig:
        if any(d < 1 for d in self.dpc):
            raise ValueError(f"synthesize.dpc={self.dpc}: every value must be >= 1")
        return self


class FamilyProtocol(_Section):
    """How the evaluator trains one learner family; a field left None follows ``evaluate``'s own
    (``lr``, ``steps``, ``warmup_ratio``, ``train_top_layers``, ``body_fraction``) or ``learner.pooling``."""

    lr: float | None = Field(None, gt=0.0)
    steps: int | None = Field(None, ge=1)
    warmup_ratio: float | None = Field(None, ge=0.0, le=1.0)
    train_top_layers: int | None = Field(None, ge=0, description="train the head and the top N blocks of the body (0: a linear probe on frozen features)")
    pooling: Literal["cls", "mean", "last"] | None = None
    body_fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep the first round(f x blocks) blocks of the body, drop the rest (features from a middle layer)")

    def overrides(self) -> dict[str, Any]:
        """The fields this family sets (None fields left out)."""
        return self.model_dump(exclude_none=True)


class DecoderProtocol(FamilyProtocol):
    # Chosen on held-out train rows (benchmarks/README.md "Learner protocols", SmolLM2-135M, random
    # SST-2 DPC-20 sets): the encoders' full fine-tune at lr 1e-4 collapses a decoder to one class
    # on 20-40 samples; a linear probe on the mean-pooled features of its first half does not.
    lr: float | None = Field(1e-2, gt=0.0)
    train_top_layers: int | None = Field(0, ge=0, description="train the head and the top N blocks of the body (0: a linear probe on frozen features)")
    pooling: Literal["cls", "mean", "last"] | None = "mean"
    body_fraction: float | None = Field(0.5, gt=0.0, le=1.0, description="keep the first round(f x blocks) blocks of the body, drop the rest (features from a middle layer)")


class ScratchProtocol(FamilyProtocol):
    # Chosen on held-out train rows (benchmarks/README.md "Learner protocols"): random weights
    # take a larger step than pretrained ones (lr 3e-3 best of 1e-4 .. 3e-3, none above chance).
    lr: float | None = Field(3e-3, gt=0.0)


class EvaluateConfig(_Section):
    lr: float = Field(1e-4, gt=0.0)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1, description="the batch is min(batch_size, |D|)")
    warmup_ratio: float = Field(0.5, ge=0.0, le=1.0)
    train_top_layers: int | None = Field(None, ge=0, description="train the head and the top N blocks of the body (0: a linear probe); None: every layer")
    body_fraction: float | None = Field(None, gt=0.0, le=1.0, description="learners keep the first round(f x blocks) blocks of their body (features from a middle layer); None: all")
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    n_evals_per_dataset: int = Field(5, ge=1, description="learner seeds per distilled set")
    eval_batch_size: int = Field(128, ge=1)
    baselines: list[Literal[BASELINES]] = Field(  # type: ignore[valid-type]  # methods.BASELINES, one name per method
        ["random", "k_centers", "herding", "lm_only"],
        description="methods run beside DiLM (methods.METHODS); dilm_filtered: DiLM's sets after the label-consistency filter (beyond the paper)",
    )
    learners: list[str] = Field([], description=f"learner architectures to evaluate ({', '.join(LEARNER_KINDS)}, hub ids); empty: learner.model")
    parallel: bool = Field(True, description="fan runs out as Ray tasks (ray.cpus_per_eval_task each)")
    icl_shots_per_class: int | None = Field(None, ge=1, description="icl:<LM> learners: demonstrations per label drawn from a set; None: all its rows")
    icl_batch_size: int = Field(16, ge=1, description="icl:<LM> learners: validation rows scored per forward pass")
    full_data_samples: int | None = Field(
        None, ge=2, description="the full-data row: each learner also trains on this many balanced train rows (a ceiling to read the sets against); None: no such row"
    )
    full_data_steps: int = Field(500, ge=1, description="learner steps of the full-data row (batch: batch_size; otherwise the sets' protocol)")
    full_data_seeds: int = Field(1, ge=1, description="learner seeds of the full-data row")
    # One protocol per learner family (evaluation.learners.family_config): what a family sets replaces
    # the fields above for its learners; the encoder family (MiniLM, BERT) uses them as they are.
    encoder: FamilyProtocol = FamilyProtocol()
    decoder: DecoderProtocol = DecoderProtocol()
    scratch: ScratchProtocol = ScratchProtocol()


class SearchSpec(_Section):
    """One Tune dimension: ``grid`` tries every value, ``choice`` samples one per trial."""

    type: Literal["grid", "choice", "loguniform", "uniform"] = "grid"
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchSpec:
        if self.type in ("grid", "choice") and not self.values:
            raise ValueError(f"a {self.type} search needs a non-empty 'values' list")
        if self.type in ("loguniform", "uniform") and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"a {self.type} search needs low < high")
        return self


class TuneConfig(_Section):
    space: dict[str, SearchSpec] = {}
    num_samples: int = Field(1, ge=1, description="samples of the choice and continuous values per grid combination, drawn from the config's seed")
    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="reports (rounds of evaluation runs: one run per DPC) before ASHA may stop a trial")
    max_concurrent_trials: int = Field(1, ge=1)
    cpus_per_trial: float = Field(0.1, gt=0.0)


class RayConfig(_Section):
    address: str | None = Field(
        None,
        description="None (or local): an embedded Ray of this command's own, unless RAY_ADDRESS is set; "
        "host:port (the GCS), auto (the cluster `ray start` started on this machine) or ray://host:port: that cluster only, "
        "checked reachable at start-up",
    )
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_eval_task: float = Field(0.0, ge=0.0)
    cpus_per_eval_task: float = Field(1.0, gt=0.0)
    max_failures: int = Field(
        0, ge=0,
        description="retries of a stage-1/2 worker group (from its latest checkpoint) and of a tune trial (its stage 2 resumed) after a failure, e.g. a lost node",
    )
    storage_path: str | None = Field(
        None, description="Ray Train checkpoints; None: <run>/ray. A URI (s3://, gs://) is passed to Ray unchanged; a local path is made absolute"
    )


class TrackingConfig(_Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None uses MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working folder. "
        "On a multi-node cluster use a server (http://<head>:5000); an http(s) server is checked reachable at start-up",
    )
    experiment: str | None = Field(None, description="defaults to dilm-<task>")
    enabled: bool = True


class Config(_Section):
    name: str = Field("dilm", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="short stable run name")
    seed: int = 42
    output_dir: str = "runs"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default")
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    learner: LearnerConfig = LearnerConfig()
    pretrain: PretrainConfig = PretrainConfig()
    distill: DistillConfig = DistillConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="bf16: mixed precision (autocast, fp32 master weights); auto: bf16 on CUDA workers (ray.use_gpu) and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32",
    )

    @field_validator("precision")
    @classmethod
    def _resolve_precision(cls, value: str, info: ValidationInfo) -> str:
        # resolved once, where the config is made: keys, records and workers see what ran
        ray = info.data.get("ray")
        return _precision.resolve(value, bool(ray and ray.use_gpu))

    # ``output_dir`` as the user gave it, before ``absolute`` resolved it against the working folder
    _given_output_dir: str | None = PrivateAttr(None)
    # where the values came from, as the user typed them: the YAML file and the dotted overrides
    # (``load_config``); records write them so that a result names the command that made it
    _config_file: str | None = PrivateAttr(None)
    _overrides: tuple[str, ...] = PrivateAttr(())

    def __eq__(self, other: object) -> bool:
        """The fields only: ``given_output_dir`` records where a value came from, not the config."""
        return type(other) is type(self) and self.__dict__ == other.__dict__

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def given_output_dir(self) -> str:
        """``output_dir`` as given in the YAML or an override (``runs``), where ``output_dir`` holds
        it resolved by ``absolute`` (``/home/me/runs``); the same for a config rebuilt from a dict."""
        return self._given_output_dir or self.output_dir

    @property
    def config_file(self) -> str | None:
        """The YAML file ``load_config`` read, as given (``configs/sst2-cpu.yaml``); None for the
        built-in defaults or a config rebuilt from a dict."""
        return self._config_file

    @property
    def overrides(self) -> tuple[str, ...]:
        """The dotted overrides ``load_config`` applied, as given (``("seed=43",)``); empty for a
        config rebuilt from a dict."""
        return self._overrides

    def absolute(self) -> Config:
        """Paths resolved against the working folder, so that Ray workers elsewhere see the same files."""

        def local(value: str | None) -> str | None:
            return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

        resolved = self.model_copy(
            update={
                "output_dir": str(Path(self.output_dir).expanduser().resolve()),
                "data": self.data.model_copy(update={"path": local(self.data.path)}),
                "generator": self.generator.model_copy(update={"model": local(self.generator.model)}),
                "learner": self.learner.model_copy(update={"model": local(self.learner.model)}),
            }
        )
        resolved._given_output_dir = self.given_output_dir
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; used for MLflow params and Tune spaces."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "space":
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``"distill.lr=3e-7" -> ("distill.lr", 3e-07)``; values are read as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"override '{text}': expected KEY=VALUE, e.g. distill.lr=3e-7")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads 3e-7 as a string; accept it as the float the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.strip(), value


def apply_override(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for key ``a.b``; unknown intermediate keys are refused."""
    parts = key.split(".")
    node = tree
    fields: dict[str, Any] = Config.model_fields
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if fields is not None and part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            if key in REMOVED_KEYS:
                raise UserError(f"config key '{key}' was removed: {REMOVED_KEYS[key]}")
            raise UserError(f"unknown config key '{key}': {where} has no '{part}' (allowed: {', '.join(sorted(fields))})")
        if last:
            node[part] = value
            return
        annotation = fields[part].annotation if fields is not None else None
        sub = annotation.model_fields if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, fields = child, sub


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        if path in REMOVED_KEYS:
            return f"config key '{path}' in {source} was removed: {REMOVED_KEYS[path]}"
        return f"unknown config key '{path}' in {source}"
    if isinstance(first.get("input"), dict):  # a section-level check: its message names the keys
        return f"config: {msg} ({source})"
    if path:
        return f"config key '{path}' = {first.get('input')!r}: {msg} ({source})"
    return f"config: {msg} ({source})"


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML defaults from ``path`` (or the built-in defaults), apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path}{where} is not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        apply_override(tree, key, value)
    if overrides:
        source += " + overrides"
    cfg = validated(tree, source)
    cfg._config_file = None if path is None else str(path)
    cfg._overrides = tuple(overrides)
    return cfg.absolute()


def validated(tree: dict[str, Any], source: str) -> Config:
    """``Config.model_validate(tree)``, raising a one-line ``UserError`` that names the key and
    ``source`` (where the values came from) instead of pydantic's report."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err, source)) from None
