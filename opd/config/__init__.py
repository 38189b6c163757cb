"""params.yaml's schema: typed, validated settings (read by :mod:`opd.params`, the only loader of settings).

Every section is a pydantic model with ``extra="forbid"`` so a typo in params.yaml fails at start
instead of silently running with a default. Errors are re-raised as :class:`ConfigError` whose
message names the dotted key (``distill.lr``) and says what is wrong with it. The sections live in
:mod:`opd.config.models` (teacher, student, teachers) and :mod:`opd.config.sections` (the rest); this
module assembles them into :class:`Params` with the checks that span sections, and re-exports them.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from opd.config.base import (CATEGORY_PATTERN, DEFAULT_TEACHER, TASKS, ConfigError, MethodName, Section, Task,
                             redact)
from opd.config.models import (ArchConfig, InitConfig, LoraConfig, ModelConfig, SFTConfig, ServerConfig,
                               StudentConfig, TeacherConfig)
from opd.config.sections import (EVAL_METRICS, CopsdConfig, CrossSFTConfig, DataConfig, DistillConfig,
                                 EvaluateConfig, FireConfig, PromoteConfig, RolloutConfig, RuntimeConfig,
                                 ScheduleConfig, TrackingConfig, WorldConfig)

__all__ = ["ArchConfig", "CATEGORY_PATTERN", "ConfigError", "CopsdConfig", "CrossSFTConfig", "DEFAULT_TEACHER",
           "DataConfig", "DistillConfig", "EVAL_METRICS", "EvaluateConfig", "FireConfig", "InitConfig", "LoraConfig",
           "MethodName", "ModelConfig", "Params", "PromoteConfig", "RolloutConfig", "RuntimeConfig", "SFTConfig",
           "ScheduleConfig", "Section", "ServerConfig", "StudentConfig", "TASKS", "Task", "TeacherConfig",
           "TrackingConfig", "WorldConfig", "redact"]


class Params(Section):
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
        if self.student.lora and self.runtime.strategy == "fsdp2":
            raise ValueError("student.lora with runtime.strategy: fsdp2 is not supported (not built: FSDP2 would shard "
                             "the frozen base too); use runtime.strategy: ddp, where each rank holds the base once")
        return self

    seed: int = Field(0, ge=0)
    world: WorldConfig = WorldConfig()
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig(sft=SFTConfig(constitution_mode="cautious"))
    student: StudentConfig = StudentConfig(
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
