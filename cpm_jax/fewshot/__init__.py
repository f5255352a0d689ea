"""Family-agnostic few-shot pieces on a model's outputs (numpy): kNN retrieval (knn) and pseudo-label selection for
self-training (pseudo_labels). The FewCLUE sampling protocol is cpm_jax.data.fewshot; the recipes that train and
evaluate with them are cpm_jax.models.plug.fewshot."""
