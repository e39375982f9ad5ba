"""The adapted model (torch): the layer, injection into a model, the objective, pruning, prediction
and the adapter checkpoint. Everything below this package imports torch; nothing torch-free imports it
(docs/architecture.md, "Dependency direction")."""
