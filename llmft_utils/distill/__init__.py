"""Context distillation (CD) and pattern-based fine-tuning (PBFT) in one loop.

Teacher: the frozen base model prompted with k demonstrations + the query. Student: a trainable copy
of the same model prompted with the query alone. The loss is taken at each example's *own* answer
position (prompts are left-padded, so that position is the last column for every row whatever the
teacher's or the student's prompt length):

    loss = (1 - alpha) * T² * D(p_T^τ, p_S^τ) + alpha * CE(gold, p_S over the verbalizers)

where D is forward KL (default), reverse KL or generalized JSD on the chosen target support
(``verbalizer`` tokens, ``topk`` tokens + one "rest" bucket, or the ``full`` vocabulary) and τ = T is the
temperature. ``alpha = 1`` is PBFT (no teacher at all). Teacher outputs are computed once and cached on
disk, keyed by everything that determines them. Training runs on ``accelerate`` (DDP/FSDP/DeepSpeed are
configuration); LoRA through ``peft`` is optional; a NaN/inf loss or gradient norm on any process stops
every process.
"""
from . import config, export, losses, student_data, teacher, training
from .config import DistillConfig
from .export import save_student
from .losses import distill_loss, divergence, forward_kl, generalized_jsd, gold_ce, reverse_kl, support_logits
from .student_data import answer_position_logits, collate, student_examples
from .teacher import (TeacherCache, TeacherModel, answer_token_ids, combine_logp, target_extract, teacher_cache_key,
                      teacher_runtime, teacher_targets)
from .training import Tracking, train_student, training_step_memory

__all__ = ["config", "export", "losses", "student_data", "teacher", "training", "DistillConfig", "answer_position_logits",
           "answer_token_ids", "collate", "combine_logp", "distill_loss", "divergence", "forward_kl", "generalized_jsd",
           "gold_ce", "reverse_kl", "save_student", "student_examples", "support_logits", "TeacherCache", "TeacherModel",
           "teacher_cache_key", "target_extract", "teacher_runtime", "teacher_targets", "Tracking", "train_student",
           "training_step_memory"]
