"""Training (torch + 🤗 transformers): ``BayesLoRATrainer`` and its callbacks (``trainer``), and the
``bayeslora train`` pipeline (``pipeline``: ``train``, checkpoints, the posterior noise scale), with its
settings and recipes (``settings``), the classifier and its predictions (``classifier``) and the
validation rank cut (``cut``)."""
