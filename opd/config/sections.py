"""The run sections of params.yaml: data, rollout, the methods' own (fire, copsd, cross_sft, distill),
evaluation, tracking, promotion, schedule, runtime."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from opd.config.base import TASKS, MethodName, Section, Task
from opd.config.models import LoraConfig


class WorldConfig(Section):
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


class DataConfig(Section):
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


class RolloutConfig(Section):
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


class FireConfig(Section):
    """FiRe-OPD (docs/algorithms.md, section 3) and its ablations, used by ``distill.method: fire``."""

    filter: bool = False  # drop trajectories whose teacher mean log-prob is below the batch quantile (off: fire_study)
    filter_quantile: float = Field(0.1, ge=0.0, lt=1.0)
    reweight: bool = True  # soft token weights (1 + alpha cT)(1 + beta cS)
    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(1.0, ge=0.0)
    normalize: Literal["trajectory", "batch"] = "trajectory"
    token_select: bool = False  # the hard token-selection rival (TIP-like), for ablations
    select_rho: float = Field(0.5, gt=0.0, le=1.0)


class CopsdConfig(Section):
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


class CrossSFTConfig(Section):
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
    # LoRA adapters on the teacher instead of a full fine-tune (merged into the saved teacher): a 1.5B
    # teacher's full fine-tune holds ~28 GB (fp32 weights, gradients, AdamW moments)
    lora: LoraConfig | None = None


class DistillConfig(Section):
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


class EvaluateConfig(Section):
    max_new_tokens: int = Field(48, ge=1)
    # a task's own budget where its answers are longer (a real model's worked solutions: reasoning 192+)
    max_new_tokens_by_task: dict[Task, Annotated[int, Field(ge=1)]] = {}
    samples: int = Field(4, ge=1)  # k for pass@1 over k samples on reasoning
    temperature: float = Field(1.0, gt=0.0)
    limit_per_task: int = Field(0, ge=0)  # 0 = the whole eval split
    batch_size: int = Field(128, ge=1)
    refusal_detector: str = "opd.evaluate:pattern_refusal"
    generations_logged: int = Field(24, ge=0)


class TrackingConfig(Section):
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


class PromoteConfig(Section):
    """The gate a challenger must pass to become champion (eval metrics of the student)."""

    metric: Literal[EVAL_METRICS] = "reasoning_accuracy"  # type: ignore[valid-type]  (a typo never promotes)
    max_drop: float = Field(0.0, ge=0.0)
    harmful_refusal_max_drop: float = Field(0.0, ge=0.0)
    over_refusal_max_rise: float = Field(0.0, ge=0.0)
    # absolute floors, also for the first champion (which has no champion to be compared with)
    min_metric: float = Field(0.05, ge=0.0, le=1.0)
    min_harmful_refusal: float = Field(0.5, ge=0.0, le=1.0)
    max_over_refusal: float = Field(0.9, ge=0.0, le=1.0)


class ScheduleConfig(Section):
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


class RuntimeConfig(Section):
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
