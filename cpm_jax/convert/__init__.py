"""Checkpoint conversion machinery shared by every model family (each family's key tables and formats live in its
folder, cpm_jax/models/<family>/, and are listed by `cpm_jax.models.registry.formats(name)`):

  common          errors, key ledgers, exactly-once target filling, atomic output, Loaded / Format
  table           a family's key table (Entry per stored tensor): load_params from per-tensor reads, stored_arrays
  orbax           cpm_jax's own params-only checkpoints, for any family
  megatron        model-parallel `mp_rank_XX_model_states.pt` shard directories and their splits
  hf_io           the weights of a Hugging Face model directory
  torch_io        safe torch.load, torch files read and written tensor by tensor; safetensors_io: the same for
                  safetensors

  loaded = registry.formats("cpm")["megatron"].load("/ckpt/CPM", mesh=mesh)    # -> Loaded(params, config, notes)
  registry.formats("cpm")["hf"].save(loaded.params, loaded.config, "/out/cpm-hf")
"""
