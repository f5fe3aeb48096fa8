"""Models, their training (optimizer, DeepSpeed, checkpoints), the loss, scoring and distillation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from atkd_core.config.base import StrictModel, cross_field_rules, when
from atkd_core.config.data import TokenizerConfig
from atkd_core.storage import is_url, known_protocol


class ModelConfig(StrictModel):
    """A model given by a built-in preset (random init, no download) or a hub id / local directory."""

    preset: str | None = Field(
        None, description="Built-in architecture preset, e.g. neox-small (see atkd_core.models)."
    )
    path: str | None = Field(None, description="Hub id or local directory loaded with from_pretrained.")
    trust_remote_code: bool = Field(
        False, description="Allow custom modelling code from the model's repository."
    )
    init_seed: int = Field(0, ge=0, description="Seed of the random initialisation of a preset. Range: >= 0.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="The attention kernel when this model trains or teaches online: auto (transformers' "
        "choice for the architecture, sdpa where it supports it), eager, sdpa, flash_attention_2 (needs "
        "CUDA and the flash-attn package) or flex_attention. The same losses whichever kernel.",
    )

    tokenizer: TokenizerConfig | None = Field(
        None,
        description="The teacher's own tokenizer, when it is not the student's (the tokenizer section): "
        "distillation across tokenizers, compared over aligned spans of text. null: the pipeline's "
        "tokenizer. Teacher only.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.path is None):
            raise ValueError("exactly one of preset and path must be set")
        if self.preset is not None:
            from atkd_core.models.presets import PRESETS  # light: a dict of sizes

            if self.preset not in PRESETS:
                raise ValueError(f"preset {self.preset!r} is unknown; allowed: {', '.join(sorted(PRESETS))}")
        return self


class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule."""

    name: Literal["adamw_torch", "adamw_deepspeed"] = Field(
        "adamw_torch",
        description="adamw_torch: torch AdamW as DeepSpeed's client optimizer (no op compilation); "
        "adamw_deepspeed: DeepSpeed's own AdamW (FusedAdam on GPU, CPU-Adam on CPU or when offloaded; "
        "compiled on first use).",
    )
    lr: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate. Range: (0, 1].")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay. Range: [0, 1].")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    warmup_ratio: float = Field(
        0.03, ge=0, le=0.5, description="Fraction of steps with linear warm-up. Range: [0, 0.5]."
    )
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    grad_clip: float = Field(1.0, ge=0, description="Global grad-norm clip; 0 disables. Range: >= 0.")

    @model_validator(mode="after")
    def _check_betas(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: {list(self.betas)} must each be in [0, 1)")
        return self


class TrainingConfig(StrictModel):
    """How a model is trained: DeepSpeed ZeRO, precision, batch, schedule, checkpoints, seed."""

    model_config = cross_field_rules(
        when("precision", ("fp16",), {"properties": {"device": {"not": {"const": "cpu"}}}}),
    )

    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage. Range: 0..3.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them "
        "from the forward: activation memory of one layer instead of all, for one more forward's "
        "compute. The same losses.",
    )
    offload_optimizer: bool = Field(False, description="Offload optimizer state to CPU (ZeRO 1-3).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on GPU. fp16 is refused on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    num_processes: int = Field(1, ge=1, le=4096, description="Processes (ranks) per node. Range: 1..4096.")
    num_nodes: int = Field(
        1,
        ge=1,
        le=4096,
        description="Machines in the job, num_processes each. Above 1, each node is started on its own "
        "(a Kubernetes indexed Job, a Slurm step) with NODE_RANK (or JOB_COMPLETION_INDEX / SLURM_NODEID) "
        "and MASTER_ADDR (MASTER_PORT, default 29500) set; or from one node over ssh with hostfile. "
        "Range: 1..4096.",
    )
    hostfile: Path | None = Field(
        None,
        description="DeepSpeed hostfile ('host slots=N' lines, num_nodes of them) to start every node from "
        "this one over ssh; null: each node is started on its own (see num_nodes).",
    )
    batch_size: int = Field(
        16, ge=1, le=1_000_000, description="Global batch in sequences per optimizer step."
    )
    micro_batch_size: int = Field(8, ge=1, le=100_000, description="Sequences per forward pass per process.")
    packing: bool = Field(
        True,
        description="Pack each micro-batch's examples into rows of data.max_length tokens, each with its "
        "own positions and attention, instead of padding every example to the longest: the same "
        "per-token losses with less padding. Not applied when loss.split_scope is sequence (that "
        "split is per row).",
    )
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split. Range: (0, 1000].")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    checkpoint_every: int = Field(200, ge=1, description="Optimizer steps between checkpoints. Range: >= 1.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Newest checkpoints kept. Range: 1..100.")
    eval_every: int = Field(100, ge=1, description="Optimizer steps between validation losses. Range: >= 1.")
    seed: int = Field(0, ge=0, description="Seed of data order, dropout and init. Range: >= 0.")

    resume: Literal["auto", "never", "require"] = Field(
        "auto",
        description="auto: resume from the newest intact checkpoint, else start clean; never: always start "
        "clean; require: fail unless a checkpoint can be resumed.",
    )

    @model_validator(mode="after")
    def _check_precision(self) -> TrainingConfig:
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError(
                "precision: 'fp16' is not supported by DeepSpeed on CPU; use fp32 (or bf16, ~5-30x slower)"
            )
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> TrainingConfig:
        per_step = self.micro_batch_size * self.world_size
        if self.batch_size % per_step != 0:
            raise ValueError(
                f"batch_size: {self.batch_size} must be a multiple of micro_batch_size x num_processes x "
                f"num_nodes = {self.micro_batch_size} x {self.num_processes} x {self.num_nodes} = {per_step}"
            )
        return self

    @property
    def world_size(self) -> int:
        """Processes in the whole job: num_processes on each of num_nodes machines."""
        return self.num_processes * self.num_nodes

    @property
    def grad_accumulation_steps(self) -> int:
        """Micro-batches accumulated per optimizer step on each process."""
        return self.batch_size // (self.micro_batch_size * self.world_size)


class FinetuneConfig(StrictModel):
    """Supervised fine-tuning of the teacher on the training split (the paper distils fine-tuned teachers)."""

    enabled: bool = Field(True, description="Fine-tune the teacher before scoring it.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Its training settings.")


DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "alpha_beta",
)


class TAIDConfig(StrictModel):
    """TAID's interpolation schedule (objective taid; defaults from the paper's released code)."""

    t_start: float = Field(
        0.4, ge=0, lt=1, description="Interpolation weight of the teacher at the first step. Range: [0, 1)."
    )
    t_end: float = Field(
        1.0, gt=0, le=1, description="The weight t never exceeds, reached by the last step. Range: (0, 1]."
    )
    alpha: float = Field(
        5e-4,
        ge=0,
        le=1,
        description="Step size of t's adaptive rise (alpha * sigmoid(momentum) * (1 - t) a step, when above "
        "the linear schedule). Range: [0, 1].",
    )
    beta: float = Field(
        0.99, ge=0, lt=1, description="Momentum of the loss's relative change. Range: [0, 1)."
    )

    @model_validator(mode="after")
    def _check_order(self) -> TAIDConfig:
        if self.t_end < self.t_start:
            raise ValueError(f"loss.taid.t_end: {self.t_end} is below t_start {self.t_start}; t only rises")
        return self


class AdaKDConfig(StrictModel):
    """AdaKD's token focusing and temperatures (objective adakd; defaults from the paper's released
    training script)."""

    temperature_scale: float = Field(
        0.5,
        ge=0,
        le=5,
        description="c in each selected token's temperature factor exp(-c * tanh(log(score / median))): "
        "0 keeps one temperature. Range: [0, 5].",
    )
    ratio_step: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Relative change of the share of tokens distilled when the loss average moves. Range: [0, 1).",
    )
    loss_tolerance: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Relative change of the loss average that moves the share. Range: [0, 1].",
    )
    loss_average: float = Field(
        0.99, ge=0, lt=1, description="Decay of the loss's moving average. Range: [0, 1)."
    )
    min_ratio: float = Field(
        0.1, gt=0, le=1, description="The smallest share of tokens distilled. Range: (0, 1]."
    )
    start: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of the distillation steps before the share may move. Range: [0, 1).",
    )


class LossConfig(StrictModel):
    """The distillation objective (docs/architecture.md, "The method")."""

    model_config = cross_field_rules(
        when(
            "split_scope",
            ("threshold",),
            {
                "properties": {"unc_threshold": {"type": "number"}, "hard_fraction": {"type": "number"}},
                "required": ["unc_threshold"],
            },
        ),
    )

    objective: Literal["sft", "kd", "atkd", "taid", "adakd"] = Field(
        "atkd",
        description="sft: cross-entropy; kd: a divergence; atkd; taid: KL to an interpolation of student "
        "and teacher that moves towards the teacher (loss.taid); adakd: loss.divergence on the hardest "
        "tokens at per-token temperatures (loss.adakd). Allowed: sft, kd, atkd, taid, adakd.",
    )
    divergence: Literal[DIVERGENCES] = Field(  # type: ignore[valid-type]
        "forward_kl",
        description="Token-level divergence for objective kd, and the one adakd applies to its tokens. "
        f"Allowed: {', '.join(DIVERGENCES)}.",
    )
    span_loss: Literal["uld", "hybrid"] = Field(
        "hybrid",
        description="For objective kd when the teacher has its own tokenizer (teacher.tokenizer): the "
        "distance between the teacher's and the student's aligned spans. uld: sorted probabilities (no "
        "shared vocabulary); hybrid: token by token where the vocabularies spell a token alike, sorted "
        "elsewhere (GOLD's). Allowed: uld, hybrid.",
    )
    setting: Literal["forward", "reverse"] = Field(
        "forward", description="ATKD over KL(teacher||student) (forward) or KL(student||teacher) (reverse)."
    )
    hard_fraction: float | Literal["auto", "epsilon"] = Field(
        0.5,
        description="ATKD k: share of tokens (highest teacher UNC) that are hard. auto: a fixed UNC "
        "threshold at the valley of the teacher's UNC histogram over the training split (Otsu's rule, "
        "from the scoring cache), the same for every batch. epsilon: easy only where the teacher is "
        "near-certain, UNC below loss.unc_epsilon, hard everywhere else. Range: (0, 1), auto or epsilon.",
    )
    unc_epsilon: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="For hard_fraction epsilon: the teacher UNC (1 - p of the reference token) below which "
        "a token is easy. Range: (0, 1).",
    )
    lam: float = Field(
        0.2, ge=0, le=1, description="ATKD lambda: weight of the easy-token loss. Range: [0, 1]."
    )
    split_scope: Literal["batch", "sequence", "threshold"] = Field(
        "batch",
        description="Where the easy/hard split is taken: the micro-batch, each row, or a fixed UNC threshold.",
    )
    unc_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="UNC at or above which a token is hard (split_scope=threshold). Range: [0, 1].",
    )
    temperature: float = Field(
        1.0, gt=0, le=100, description="Softmax temperature on both sides. Range: (0, 100]."
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD beta (GKD). Range: [0, 1].")
    skew_alpha: float = Field(0.1, ge=0, le=1, description="Skew KL alpha (DistiLLM). Range: [0, 1].")
    abkd_alpha: float = Field(
        0.2,
        ge=0,
        le=2,
        description="ABKD's alpha for divergence alpha_beta: (1, 0) is forward KL, (0, 1) reverse KL, "
        "(0.5, 0.5) twice the squared Hellinger distance; a larger alpha concentrates the student on the "
        "teacher's likely tokens. Default (0.2, 0.7): the paper's released GPT-2 script. Range: [0, 2].",
    )
    abkd_beta: float = Field(
        0.7,
        ge=0,
        le=2,
        description="ABKD's beta for divergence alpha_beta; a larger beta spreads the student's mass "
        "over the teacher's whole distribution. Range: [0, 2].",
    )
    taid: TAIDConfig = Field(default_factory=TAIDConfig, description="TAID's schedule (objective taid).")
    adakd: AdaKDConfig = Field(
        default_factory=AdaKDConfig, description="AdaKD's focusing and temperatures (objective adakd)."
    )
    ce_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Weight of cross-entropy mixed into the distillation loss. Range: [0, 1].",
    )
    chunk_size: int | Literal["auto"] | None = Field(
        "auto",
        description="Tokens per chunk of vocabulary-sized work; auto: sized by memory, 4M logits a chunk on "
        "plain logits (128 tokens at V=32000), 32M with a fused output layer (256 tokens at V=128000), the "
        "fastest measured on CPU; null for unchunked. Range: >= 1, auto or null.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compile each chunk's loss math with torch.compile (Triton kernels on CUDA, C++ on "
        "CPU; the same function as the eager path, the same values up to float rounding). auto: on CUDA "
        "when Triton is installed, off on CPU (where compiling costs more than it saves in short runs).",
    )
    fused_linear: bool = Field(
        True,
        description="Apply the student's (and an online teacher's) output layer inside the loss, chunk by "
        "chunk, so the [tokens, vocabulary] logits are never built; false: plain logits (the same values).",
    )

    @field_validator("hard_fraction", mode="before")
    @classmethod
    def _check_hard_fraction(cls, value: Any) -> Any:
        # One message for both forms (a union would report one line per member).
        if value in ("auto", "epsilon"):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("must be a number in (0, 1), auto or epsilon") from None
        # 0 and 1 only where a threshold splits (checked with split_scope below): a resolved auto or
        # epsilon split records the share it makes hard, which may be all or none of the tokens.
        if isinstance(value, bool) or not 0 <= number <= 1:
            raise ValueError("must be a number in (0, 1), auto or epsilon")
        return number

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _check_chunk_size(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("must be a number of tokens >= 1, auto or null")
        return value

    @model_validator(mode="after")
    def _check_threshold(self) -> LossConfig:
        if self.hard_fraction in (0.0, 1.0) and self.split_scope != "threshold":
            raise ValueError(
                f"loss.hard_fraction: {self.hard_fraction} leaves a group empty; must be a number in (0, 1), "
                "auto or epsilon"
            )
        if self.hard_fraction in ("auto", "epsilon") and self.split_scope == "threshold":
            raise ValueError(
                f"loss.hard_fraction: {self.hard_fraction} chooses the UNC threshold itself; it cannot be "
                "combined with loss.split_scope 'threshold' (drop one of them)"
            )
        if self.split_scope == "threshold" and self.unc_threshold is None:
            raise ValueError("loss.unc_threshold: must be set when loss.split_scope is 'threshold'")
        return self


class ScoringConfig(StrictModel):
    """The offline teacher cache (one teacher pass over the training split)."""

    top_k: int = Field(
        64, ge=1, le=4096, description="Teacher top-K token ids and log-probs kept per token. Range: 1..4096."
    )
    storage_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of cached log-probs with encoding float."
    )
    encoding: Literal["float", "compact"] = Field(
        "compact",
        description=(
            "How shards store each token's top-K: float (int32 ids, storage_dtype log-probs) or compact "
            "(Elias-Fano ids, log-probs on a per-token grid of logprob_bits; about half the bytes of float "
            "with bfloat16)."
        ),
    )
    logprob_bits: int = Field(
        8,
        ge=2,
        le=16,
        description="Bits per cached top-K log-prob with encoding compact. Range: 2..16.",
    )
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per teacher forward. Range: 1..4096.")
    shard_size: int = Field(1024, ge=1, description="Examples per shard. Range: >= 1.")
    location: str | None = Field(
        None,
        description=(
            "Where the cache is kept: null for <workdir>/teacher_cache, or a URL that fsspec opens "
            "(s3://bucket/prefix, gs://, az://, file:///shared/cache). With a URL the cache is scored "
            "into <workdir>/teacher_cache, uploaded, and read from the URL by byte ranges (reused there "
            "when it holds one made from the same inputs). Range: null or scheme://path."
        ),
    )

    @field_validator("location")
    @classmethod
    def _check_location(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not is_url(value):
            raise ValueError(
                "must be a URL (scheme://path, e.g. s3://bucket/cache) or null for the workdir's"
            )
        if not known_protocol(value):
            raise ValueError(f"{value.split('://', 1)[0]}:// is not a scheme fsspec knows")
        return value.rstrip("/")


class DistillConfig(StrictModel):
    """Training the student against the teacher."""

    model_config = cross_field_rules(
        when(
            "data_source",
            ("student_generated", "on_policy"),
            {
                "properties": {"teacher_source": {"const": "online"}, "sft_warmup_epochs": {"maximum": 0}},
                "required": ["teacher_source"],
            },
        ),
    )

    teacher_source: Literal["offline", "online"] = Field(
        "offline",
        description="offline: the scoring cache, no teacher in memory; online: teacher forward in the loop.",
    )
    data_source: Literal["ground_truth", "teacher_generated", "student_generated", "on_policy"] = Field(
        "ground_truth",
        description="Supervised KD / SeqKD / ImitKD / GKD-style mixing (generated ones need online).",
    )
    generation_max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Longest teacher response for teacher_generated data. Range: 1..4096."
    )
    generation_temperature: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Sampling temperature of teacher_generated data; 0 is greedy. Range: [0, 10].",
    )
    on_policy_ratio: float = Field(
        0.5, ge=0, le=1, description="Share of student-generated batches (on_policy). Range: [0, 1]."
    )
    sft_warmup_epochs: float = Field(
        0.0,
        ge=0,
        le=100,
        description=(
            "Epochs of plain cross-entropy on the training responses before the distillation loss "
            "takes over, added to training's budget (the same for every objective): a stand-in for "
            "the pretrained student the paper starts from. Range: [0, 100]."
        ),
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Its training settings.")

    @model_validator(mode="after")
    def _generated_needs_online(self) -> DistillConfig:
        if self.data_source in ("student_generated", "on_policy") and self.teacher_source != "online":
            raise ValueError(
                f"teacher_source: 'offline' cannot serve data_source {self.data_source!r}; set teacher_source: online"
            )
        if self.sft_warmup_epochs > 0 and self.data_source in ("student_generated", "on_policy"):
            raise ValueError(
                f"sft_warmup_epochs: {self.sft_warmup_epochs} needs fixed responses; data_source "
                f"{self.data_source!r} generates them during training (use ground_truth or teacher_generated)"
            )
        return self
