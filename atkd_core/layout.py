"""Where each stage of a pipeline run writes, under the run's ``workdir``: one place that decides it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The stage directories of one pipeline run."""

    workdir: Path

    @property
    def prepared(self) -> Path:
        """prepare_data: tokenizer, tokenised splits, raw JSONL."""
        return self.workdir / "prepared"

    @property
    def teacher_generated(self) -> Path:
        """generate_teacher_data (SeqKD): the teacher's responses as prepared data."""
        return self.workdir / "prepared_teacher_generated"

    @property
    def teacher_init(self) -> Path:
        """The teacher preset's seeded initialisation."""
        return self.workdir / "models" / "teacher-init"

    @property
    def teacher(self) -> Path:
        """finetune_teacher: the fine-tuned teacher."""
        return self.workdir / "models" / "teacher"

    @property
    def student_init(self) -> Path:
        """The student preset's seeded initialisation."""
        return self.workdir / "models" / "student-init"

    @property
    def student(self) -> Path:
        """distill_student: the distilled student."""
        return self.workdir / "models" / "student"

    @property
    def teacher_cache(self) -> Path:
        """score_teacher: the sparse teacher cache."""
        return self.workdir / "teacher_cache"

    @property
    def teacher_report(self) -> Path:
        """The teacher's token-difficulty report."""
        return self.workdir / "reports" / "teacher"

    @property
    def eval(self) -> Path:
        """evaluate: harness results and summaries."""
        return self.workdir / "eval"

    def checkpoints(self, stage: str) -> Path:
        """Training checkpoints of ``stage`` ("finetune" or "distill")."""
        return self.workdir / "checkpoints" / stage
