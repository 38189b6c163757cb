"""params.yaml's schema: typed, validated settings (read by :mod:`opd.params`, the only loader of settings).

Every section is a pydantic model with ``extra="forbid"`` so a typo in params.yaml fails at start
instead of silently running with a default. Errors are re-raised as :class:`ConfigError` whose
message names the dotted key (``distill.lr``) and says what is wrong with it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator


Task = Literal["reasoning", "safety", "borderline", "general"]  # what a data row asks of the model
TASKS: tuple[str, ...] = get_args(Task)
MethodName = Literal["opd", "gkd", "sft", "fire", "copsd"]  # the keys of opd.methods.METHODS (a test checks)
DEFAULT_TEACHER = "default"  # the name rows without a `teacher` are routed to (`teacher:`); not a name in `teachers:`
CATEGORY_PATTERN = r"^[a-z][a-z0-9_]*$"  # a row's harm category: a lowercase label naming its constitution


class ConfigError(ValueError):
    """A bad params.yaml: the message names the key and the problem."""


class _Section(BaseModel):
    # strict: `steps: true` is not 1 and `steps: 2.5` is not 2 (ints accept ints only; floats accept ints)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True)


class WorldConfig(_Section):
    """Sizes of the embedded default world (ignored when ``data.source`` is not ``embedded``)."""

    n_reasoning: int = Field(3000, ge=10)
    n_safety: int = Field(640, ge=10)
    n_borderline: int = Field(256, ge=10)
    n_general: int = Field(528, ge=10)
    # held-out borderline prompts on top of the split above (eval only): unseen activities in phrasings the
    # harmful set never uses, one per (activity, phrasing) group, at most 250
    n_borderline_eval: int = Field(250, ge=0)
    eval_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    max_operand: int = Field(9, ge=2, le=99)
    max_steps: int = Field(3, ge=1, le=4)
    vocab_size: int = Field(512, ge=280, le=4096)


class DataConfig(_Section):
    """Where prompts come from: the embedded world, or the user's own JSONL / datasets files."""

    source: Literal["embedded", "jsonl", "datasets"] = "embedded"
    # jsonl: one file with a `split` column, or a folder with train.jsonl / eval.jsonl.
    # datasets: a folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
    path: str | None = None
    tokenizer_path: str | None = None  # a tokenizer folder to use instead of training one
    min_prompt_chars: int = Field(1, ge=1)
    max_prompt_chars: int = Field(400, ge=8)
    max_reference_chars: int = Field(800, ge=8)
    # how reasoning references state the final answer (opd/answers.py): auto | answer_line | gsm8k |
    # boxed | last_number | "module:function"
    answer_format: str = "auto"

    @model_validator(mode="after")
    def _path_for_user_data(self) -> DataConfig:
        if self.source != "embedded" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.min_prompt_chars > self.max_prompt_chars:
            raise ValueError("data.min_prompt_chars must not exceed data.max_prompt_chars")
        from opd.answers import FORMATS

        if self.answer_format not in FORMATS and ":" not in self.answer_format:
            raise ValueError(f"data.answer_format {self.answer_format!r}: expected one of {list(FORMATS)} "
                             "or 'module:function'")
        return self


class ArchConfig(_Section):
    """A Llama-style model built from scratch (only used when no ``path`` is given)."""

    hidden_size: int = Field(96, ge=8)
    num_layers: int = Field(3, ge=1)
    intermediate_size: int = Field(288, ge=8)
    num_heads: int = Field(4, ge=1)
    max_positions: int = Field(160, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self


class SFTConfig(_Section):
    """Supervised training of a model from scratch on the prepared train split."""

    steps: int = Field(400, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    tasks: list[Task] = list(TASKS)
    # Safety rows of only these harm categories (null = all): a partly aligned model.
    safety_categories: list[Annotated[str, StringConstraints(pattern=CATEGORY_PATTERN)]] | None = None
    # Embedded world only: "cautious" also trains on constitution-wrapped copies of the rows with
    # over-cautious answers (opd/world/behaviour.py), the problem setting COPSD addresses.
    constitution_mode: Literal["none", "cautious"] = "none"
    # Reasoning rows of these categories (problem types) get a wrong final answer: a teacher of
    # controlled reliability, for studying what the FiRe filter does when the teacher errs.
    wrong_answer_categories: list[Annotated[str, StringConstraints(pattern=CATEGORY_PATTERN)]] = []


class InitConfig(_Section):
    """The student derived from the teacher by layer pruning (``student.init``): the teacher's
    embeddings, norm, head, tokenizer and chat template, and a subset of its decoder layers."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    from_: Literal["teacher"] = Field("teacher", alias="from")
    keep_layers: list[int] | None = None  # explicit indices, e.g. [0, 10, 20, 29]
    n_layers: int | None = Field(None, ge=1)  # or K evenly spaced layers (first and last kept)

    @model_validator(mode="after")
    def _one_choice(self) -> InitConfig:
        if (self.keep_layers is None) == (self.n_layers is None):
            raise ValueError("student.init: set exactly one of keep_layers or n_layers")
        return self


class ServerConfig(_Section):
    """A teacher scored by an OpenAI-compatible completions server (``vllm serve``, ``python -m flows
    serve-teacher``) instead of loaded in every process (opd/remote.py, docs/teacher-server.md)."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+")]  # http(s)://host:port; the API key from $OPD_TEACHER_API_KEY
    model: str | None = None  # the served model's id (null: the server's first model)
    top_k: int = Field(20, ge=1)  # the distribution terms (gkd, fkl_coef, teacher entropy) use top-k + a tail bucket
    timeout_s: float = Field(120.0, gt=0)  # one request's whole budget, retries with backoff included
    max_batch_tokens: int = Field(8192, ge=1)  # prompt + response tokens per request; requests go concurrently
    concurrency: int = Field(4, ge=1)

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        from urllib.parse import urlsplit

        if "@" in urlsplit(url).netloc:
            raise ValueError("the URL holds credentials, which params.yaml, dvc.lock and MLflow would keep: give the "
                             "address alone and the server's API key in OPD_TEACHER_API_KEY")
        return url.rstrip("/")


class ModelConfig(_Section):
    """A teacher or the student: a local folder, or an architecture trained in the teacher stage.
    The student may instead be pruned from the teacher (``init``), then SFT-ed when ``sft.steps`` > 0."""

    path: str | None = None
    arch: ArchConfig = ArchConfig()
    sft: SFTConfig = SFTConfig()
    init: InitConfig | None = None

    @model_validator(mode="after")
    def _path_or_init(self) -> ModelConfig:
        if self.path and self.init:
            raise ValueError("set either path or init (a student pruned from the teacher), not both")
        return self


class TeacherConfig(ModelConfig):
    """A teacher: a model folder or architecture (:class:`ModelConfig`), optionally scored by a server
    (``server``), whose folder then still gives the tokenizer and chat template."""

    server: ServerConfig | None = None


class RolloutConfig(_Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    # What a response cut at max_new_tokens (no EOS) contributes: kept as is, or masked out.
    truncated: Literal["keep", "mask"] = "keep"
    # backend: vllm (GPU machines): colocated engine per rank, or a `trl vllm-serve` server
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    # backend transformers: the sampler's weights. fp32 samples the policy being trained exactly; bf16 /
    # fp16 sample from a half-precision copy of the student, refreshed before every rollout (half the
    # bytes a memory-bound decode step reads; behaviour log-probs still come from the fp32 student)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


class FireConfig(_Section):
    """FiRe-OPD (docs/algorithms.md, section 3) and its ablations, used by ``distill.method: fire``."""

    filter: bool = False  # drop trajectories whose teacher mean log-prob is below the batch quantile (off: fire_study)
    filter_quantile: float = Field(0.1, ge=0.0, lt=1.0)
    reweight: bool = True  # soft token weights (1 + alpha cT)(1 + beta cS)
    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(1.0, ge=0.0)
    normalize: Literal["trajectory", "batch"] = "trajectory"
    token_select: bool = False  # the hard token-selection rival (TIP-like), for ablations
    select_rho: float = Field(0.5, gt=0.0, le=1.0)


class CopsdConfig(_Section):
    """COPSD's distillation (docs/algorithms.md, sections 4-5), used by ``distill.method: copsd``."""

    n: int = Field(8, ge=2)  # samples per prompt (the group of the advantage normalisation)
    reward_low: float = -3.0
    reward_high: float = 5.0
    kl_coef: float = Field(0.005, ge=0.0)  # KL(pi_S || pi_init), k3 estimator
    constitutions: str | None = None  # a JSON file {category: template}; null = the prepared set
    # original: the teacher stage's teacher ("constitution OPSD", the baseline without Cross-SFT);
    # cross_sft: the teacher recalibrated by the cross_sft stage (COPSD proper);
    # self: the initial student itself reading the constitution (self-distillation, the COPSD paper's setting).
    teacher: Literal["cross_sft", "original", "self"] = "cross_sft"
    # where the teacher reads the constitution: user (the template around the query, x_c) or system
    # (the template without its query slot as the system turn, the bare query as the user turn)
    constitution_role: Literal["user", "system"] = "user"
    prompts_per_step: int = Field(8, ge=1)  # x n samples each
    lr: float = Field(1e-4, gt=0.0, le=1.0)  # group-normalised advantages have unit variance: smaller than OPD's lr
    # The reference code's second path ("OPSDGate"): rows of these tasks get an OUTCOME reward per
    # response from `outcome_judge`, normalised over the prompt's n responses and spread over its tokens;
    # the other rows keep the token-level teacher reward.
    outcome_tasks: list[Task] = []
    # checker: reasoning the right answer (1/0), safety a refusal (1/0), borderline and general 0 when
    # refused else token F1 vs the reference; or "module:function" (row, response text) -> float, e.g. a
    # local judge model
    outcome_judge: str = "checker"
    # token: the token rewards normalised over the group's tokens (COPSD); sequence: each response's
    # mean token reward, normalised over the group's responses, the same for all its tokens
    credit: Literal["token", "sequence"] = "token"
    # COPSD's own mass-covering term (distill.fkl_coef / fkl_beta are opd's and fire's): fkl_coef x
    # JSD_fkl_beta(teacher || student) per token on the teacher's distribution (beta 0: forward KL),
    # over distill.top_k. 0.5 / 0: the best of experiments/copsd_evidence.py (docs/copsd.md)
    fkl_coef: float = Field(0.5, ge=0.0)
    fkl_beta: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> CopsdConfig:
        if self.reward_low >= self.reward_high:
            raise ValueError("copsd.reward_low must be below copsd.reward_high")
        return self


class CrossSFTConfig(_Section):
    """The cross_sft stage: recalibrate the teacher on two crossed sources (docs/algorithms.md, sections 4-5)."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    warmup_steps: int = Field(5, ge=0)
    # (a) the initial student's own answers to these prompts, kept when the checker accepts them
    include_self: bool = True  # false: the "w/o self" ablation (source (a) dropped)
    self_tasks: list[Task] = ["reasoning", "borderline", "general"]
    samples: int = Field(8, ge=1)  # student samples per prompt
    keep: Literal["first", "best"] = "first"  # which accepted sample: the first, or the highest token F1
    min_f1: float = Field(0.3, ge=0.0, le=1.0)  # checker: not a refusal, token F1 vs reference >= this
    # (b) safety prompts answered by the oracle: null = the rows' reference refusals, or a local
    # model folder that answers the constitution-wrapped prompt (greedy)
    oracle: str | None = None


class DistillConfig(_Section):
    method: MethodName = "opd"
    # single: every row is scored by `teacher`; by_row: a row's `teacher` field names one of
    # `teachers` (rows without one use `teacher`).
    routing: Literal["single", "by_row"] = "single"
    # by_row: this fraction of rows goes to a wrong teacher (drawn per row id and seed): a teacher out of
    # its domain on some rows, for studying what FiRe's filter does with unreliable teacher signals
    routing_noise: float = Field(0.0, ge=0.0, le=1.0)
    # opd: sampled-token reverse-KL advantage with a policy-gradient loss (docs/algorithms.md, sections 1-2).
    # gkd: full-vocabulary divergence below, with a lambda mix of on-policy and dataset batches.
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    lambda_on_policy: float = Field(0.5, ge=0.0, le=1.0)
    # gkd: the one temperature of GKD, for its sampling AND its loss (0.9 as in GKD / TRL)
    temperature: float = Field(0.9, gt=0.0)
    top_k: int = Field(0, ge=0)  # gkd, fkl_coef: 0 full vocabulary; k > 0 teacher top-k with a tail bucket
    chunk_size: int = Field(1024, ge=1)  # positions per LM-head chunk: memory ~ chunk x vocab
    steps: int = Field(400, ge=1)
    pg_loss: Literal["ppo", "plain"] = "ppo"
    prompts_per_step: int = Field(64, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    # Optimiser steps per rollout batch = ppo_epochs x mini_batches (opd, fire, copsd). 1: the PPO ratio
    # is exactly 1 and the behaviour log-probs come from the update's own forward (no extra pass).
    ppo_epochs: int = Field(1, ge=1)
    mini_batches: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    dual_clip: float = Field(3.0, gt=1.0)
    kl_coef: float = Field(0.0, ge=0.0)  # KL(pi_S || pi_init), low-variance (k3) estimator
    # opd and fire (copsd has its own: copsd.fkl_coef): a mass-covering term on the teacher's whole
    # next-token distribution added to the sampled-token loss, fkl_coef x JSD_fkl_beta(teacher || student)
    # per token (beta 0: forward KL), at the rollout temperature, over distill.top_k (0: the full
    # vocabulary). From the teacher's scoring pass.
    fkl_coef: float = Field(0.0, ge=0.0)
    fkl_beta: float = Field(0.0, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(25, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    resume: Literal["auto", "never"] = "auto"
    tasks: list[Task] = list(TASKS)
    log_every: int = Field(5, ge=1)
    # Run each step's rollout / score / shape / update as Prefect tasks (opd, fire, copsd); false:
    # the whole loop is one task. Costs about 6 ms per unit on the local API (docs/tracking.md).
    step_tasks: bool = True


class EvaluateConfig(_Section):
    max_new_tokens: int = Field(48, ge=1)
    # a task's own budget where its answers are longer (a real model's worked solutions: reasoning 192+)
    max_new_tokens_by_task: dict[Task, Annotated[int, Field(ge=1)]] = {}
    samples: int = Field(4, ge=1)  # k for pass@1 over k samples on reasoning
    temperature: float = Field(1.0, gt=0.0)
    limit_per_task: int = Field(0, ge=0)  # 0 = the whole eval split
    batch_size: int = Field(128, ge=1)
    refusal_detector: str = "opd.evaluate:pattern_refusal"
    generations_logged: int = Field(24, ge=0)


_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the user and password of every URI in it replaced by ``***`` (messages, params)."""
    return _USERINFO.sub(r"\1***@", text)


class TrackingConfig(_Section):
    """MLflow: ``MLFLOW_TRACKING_URI`` wins over ``uri``; default a SQLite store in the project."""

    uri: str | None = None
    experiment: str = "opd"
    registered_model: str = "opd-student"

    @field_validator("uri")
    @classmethod
    def _no_secret_in_settings(cls, uri: str | None) -> str | None:
        from urllib.parse import urlsplit

        if uri and "@" in uri and urlsplit(uri).password is not None:
            raise ValueError("tracking.uri holds a password, which params.yaml, dvc.lock, MLflow's params and Prefect's "
                             "database would all keep: give the server's address alone and the credentials in "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        return uri


# What the evaluate stage reports for a model (opd/evaluate.py); the promotion gate compares one of these.
EVAL_METRICS = ("reasoning_accuracy", "reasoning_pass1", "harmful_refusal", "over_refusal", "general_helpfulness",
                "borderline_helpfulness", "response_length", "token_entropy")


class PromoteConfig(_Section):
    """The gate a challenger must pass to become champion (eval metrics of the student)."""

    metric: Literal[EVAL_METRICS] = "reasoning_accuracy"  # type: ignore[valid-type]  (a typo never promotes)
    max_drop: float = Field(0.0, ge=0.0)
    harmful_refusal_max_drop: float = Field(0.0, ge=0.0)
    over_refusal_max_rise: float = Field(0.0, ge=0.0)
    # absolute floors, also for the first champion (which has no champion to be compared with)
    min_metric: float = Field(0.05, ge=0.0, le=1.0)
    min_harmful_refusal: float = Field(0.5, ge=0.0, le=1.0)
    max_over_refusal: float = Field(0.9, ge=0.0, le=1.0)


class ScheduleConfig(_Section):
    """A deployment of opd_pipeline on this cron schedule: served by one process (``python -m flows
    serve``) or placed on a Prefect work pool (``python -m flows deploy``) whose workers run it."""

    deployment: str = "opd-nightly"
    cron: str = "0 3 * * *"
    work_pool: str = "opd"  # python -m flows deploy: a `process` pool, created when missing

    @model_validator(mode="after")
    def _cron_fields(self) -> ScheduleConfig:
        if len(self.cron.split()) != 5:
            raise ValueError(f"schedule.cron must have 5 fields (minute hour day month weekday), got {self.cron!r}")
        return self


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # torch.set_num_threads; 0 = the cores this process may use (its CPU affinity), shared evenly by the
    # processes of one launch. On a shared machine set it (1 thread was 19x faster than all cores there).
    threads: int = Field(0, ge=0)
    # bf16 / fp16: teachers and the reference model load in that dtype, every engine pass runs under autocast
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # not "no": YAML 1.1 reads it as false
    trust_remote_code: bool = False
    # The distill stage under N processes (torchrun: gloo on CPU, NCCL on GPUs); the global batch is sharded.
    num_processes: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp2"] = "ddp"  # fsdp2: GPUs only (accelerate falls back to DDP on CPU)
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (memory for time)
    # what keeps freed CPU blocks for reuse instead of unmapping them (opd/allocator.py), so steps stop paying
    # page faults for the same large tensors: mimalloc (preloaded by python -m flows; reuse certain), glibc
    # (mallopt; reuse in most steps), system (neither). Resident memory stays at its peak with the first two.
    allocator: Literal["mimalloc", "glibc", "system"] = "mimalloc"


class Params(_Section):
    """The whole params.yaml."""

    @model_validator(mode="after")
    def _routing_needs_teachers(self) -> Params:
        if self.distill.routing == "by_row" and not self.teachers:
            raise ValueError("distill.routing: by_row needs named teachers under `teachers:`")
        bad = sorted(n for n in self.teachers if n == DEFAULT_TEACHER or not n.isidentifier())
        if bad:
            raise ValueError(f"teachers: invalid teacher names {bad} (identifiers, not 'default')")
        if self.teacher.init or any(t.init for t in self.teachers.values()):
            raise ValueError("init (pruning from the teacher) is a student setting: student.init")
        if self.teacher.server and self.distill.method == "copsd" and self.copsd.teacher != "original":
            raise ValueError(f"teacher.server serves the original teacher, but copsd.teacher is {self.copsd.teacher!r} "
                             "(a model trained or held here): set copsd.teacher: original, or serve that model and "
                             "point teacher.server at it with copsd.teacher: original")
        if self.rollout.dtype != "fp32" and (self.rollout.backend != "transformers" or self.runtime.strategy != "ddp"):
            raise ValueError("rollout.dtype: a half-precision sampler copy is for backend transformers under ddp "
                             "(vLLM has its own dtype; FSDP2 shards the student, so no whole copy exists)")
        return self

    seed: int = Field(0, ge=0)
    world: WorldConfig = WorldConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig(sft=SFTConfig(constitution_mode="cautious"))
    student: ModelConfig = ModelConfig(
        arch=ArchConfig(hidden_size=64, num_layers=2, intermediate_size=192, num_heads=4),
        sft=SFTConfig(steps=250, safety_categories=["violence", "illegal"]),
    )
    teachers: dict[str, TeacherConfig] = {}  # named extra teachers (multi-teacher routing)
    rollout: RolloutConfig = RolloutConfig()
    distill: DistillConfig = DistillConfig()
    fire: FireConfig = FireConfig()
    copsd: CopsdConfig = CopsdConfig()
    cross_sft: CrossSFTConfig = CrossSFTConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    runtime: RuntimeConfig = RuntimeConfig()
