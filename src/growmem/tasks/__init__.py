"""Deterministic data tasks for growmem's experiments (torch + numpy only).

Every task is a :class:`Task` with ``vocab_size``, ``seq_len``, ``batch(batch_size, seed_or_generator)``
returning ``{"input_ids": LongTensor [B, T], "targets": LongTensor [B, T] (aligned, -100 = not scored),
**metadata}`` and ``evaluate(model, n_samples, batch_size, seed) -> {metric: float}``.

=================  =============================================  ==========================================
name               class (config)                                  metrics
=================  =============================================  ==========================================
``mqar``           MQARTask (MQARConfig)                           accuracy, accuracy/num_kv_pairs=<n>, ...
``niah``           NIAHTask (NIAHConfig)                           accuracy, accuracy/len=<L>/depth=<d>, ...
``copy``           CopyTask (CopyConfig)                           token_accuracy, sequence_accuracy
``reverse``        ReverseTask (CopyConfig)                        token_accuracy, sequence_accuracy
``assoc_recall``   AssociativeRecallTask (AssocRecallConfig)       accuracy
``long_delay``     LongDelayTask (LongDelayConfig)                 accuracy
``text``           TextTask (TextConfig)                           bpb, loss, bpb/within_train_len, ...
=================  =============================================  ==========================================

``make_task("mqar", seq_len=128, num_kv_pairs=8)`` builds one by name.
"""

from __future__ import annotations

from typing import Any

from growmem.tasks.base import IGNORE_INDEX, Task, as_rng, greedy_decode
from growmem.tasks.long_delay import LongDelayConfig, LongDelayTask
from growmem.tasks.mqar import MQARConfig, MQARTask
from growmem.tasks.niah import NIAHConfig, NIAHTask
from growmem.tasks.synthetic import AssociativeRecallTask, AssocRecallConfig, CopyConfig, CopyTask, ReverseTask
from growmem.tasks.text import TextConfig, TextTask, corpus_info, english_corpus

#: Registry: task name -> Task subclass (its ``Config`` dataclass lists the options).
TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (MQARTask, NIAHTask, CopyTask, ReverseTask, AssociativeRecallTask, LongDelayTask, TextTask)
}


def make_task(name: str, **options: Any) -> Task:
    """The task registered as ``name``, configured by ``options`` (fields of its ``Config``).

    Raises ValueError for an unknown name (listing the known ones), an unknown option (listing the valid
    ones) or an impossible configuration (saying why)."""
    try:
        cls = TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
    return cls(**options)


__all__ = [
    "IGNORE_INDEX", "TASKS", "AssocRecallConfig", "AssociativeRecallTask", "CopyConfig", "CopyTask",
    "LongDelayConfig", "LongDelayTask", "MQARConfig", "MQARTask", "NIAHConfig", "NIAHTask", "ReverseTask",
    "Task", "TextConfig", "TextTask", "as_rng", "corpus_info", "english_corpus", "greedy_decode", "make_task",
]
