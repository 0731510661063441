"""Fine-tuning and evaluation: the loop (:mod:`.train`), prompt modes (:mod:`.modes`), losses,
metrics, evaluation, config, checkpoints, embedding cache, distributed helpers, LR schedule."""
