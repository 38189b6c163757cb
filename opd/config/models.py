"""The model sections of params.yaml: ``teacher``, ``student`` (with ``student.lora``), ``teachers``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator, model_validator

from opd.config.base import CATEGORY_PATTERN, TASKS, Section, Task


class ArchConfig(Section):
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


class SFTConfig(Section):
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


class InitConfig(Section):
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


class ServerConfig(Section):
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


class ModelConfig(Section):
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


class LoraConfig(Section):
    """``student.lora``: the distill stage trains PEFT LoRA adapters on a frozen student instead of every
    weight (opd/lora.py). The reference model and a ``copsd.teacher: self`` teacher are the same base with
    the adapters switched off (no second copy); checkpoints hold the adapters and their optimiser state;
    the saved student is the merged model, a plain folder ``from_pretrained`` loads."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)  # the update is (alpha / r) * B @ A
    # 0 by default: dropout would make the log-probs a step scores (the PPO ratio's old and new) noisy
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # PEFT module names (suffixes), or all-linear: every linear layer but the LM head
    target_modules: list[Annotated[str, StringConstraints(min_length=1)]] | Literal["all-linear"] = "all-linear"
    keep_adapter: bool = False  # also write the adapter folder (PEFT's format) as <student>/adapter


class StudentConfig(ModelConfig):
    """The student: a model folder, an architecture or a pruned teacher (:class:`ModelConfig`), trained in
    full by the distill stage, or through LoRA adapters (``lora``)."""

    lora: LoraConfig | None = None


class TeacherConfig(ModelConfig):
    """A teacher: a model folder or architecture (:class:`ModelConfig`), optionally scored by a server
    (``server``), whose folder then still gives the tokenizer and chat template."""

    server: ServerConfig | None = None
