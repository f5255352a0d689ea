"""Checkpoint conversion machinery shared by every model family (each family's key tables and formats live in its
folder, cpm_jax/models/<family>/, and are listed by `cpm_jax.models.registry.formats(name)`):

  common          errors, key ledgers, exactly-once target filling, atomic output, Loaded / Format
  orbax           cpm_jax's own params-only checkpoints, for any family
  megatron        model-parallel `mp_rank_XX_model_states.pt` shard directories and their splits
  hf_io           the weights of a Hugging Face model directory
  torch_io        safe torch.load; safetensors_io: streaming safetensors reading and writing

  loaded = registry.formats("cpm")["megatron"].load("/ckpt/CPM", mesh=mesh)    # -> Loaded(params, config, notes)
  registry.formats("cpm")["hf"].save(loaded.params, loaded.config, "/out/cpm-hf")
"""
