"""CPM-KM: knowledge-graph embeddings (DistMult, TransE, ComplEx) with the entity table sharded over the mesh.

  config.KGConfig            sizes, scoring function, negatives, loss, regularization
  scoring                    the scoring functions, per triple and as query x candidates products
  negatives                  PyTorch-BigGraph's chunked negatives and the softmax / margin losses
  model                      param specs (logical axes), KGEmbeddingModel for the train loop
  ranking                    filtered MRR / Hits@k over all entities, computed in sharded entity blocks
  query                      the top-k tails / heads of queries, also in sharded blocks
  data                       the Grain pipeline over triples and KGData for the train loop
  release                    the CPM-KG release's .npy pages <-> a sharded params checkpoint
"""
