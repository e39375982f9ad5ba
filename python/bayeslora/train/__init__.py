"""Training (torch + 🤗 transformers): ``BayesLoRATrainer`` and its callbacks (``trainer``), and the
``bayeslora train`` pipeline (``pipeline``: ``TrainSettings``, recipes, ``train``, checkpoints)."""
