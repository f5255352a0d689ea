"""PLUG checkpoint conversion: release-style DeepSpeed shards (split here by hand from FORMATS.md) <-> params <-> Orbax."""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cpm_jax import partitioning
from cpm_jax.models.plug import convert as convert_plug
from cpm_jax.convert.common import ConversionError
from cpm_jax.models import plug
from cpm_jax.convert import orbax

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = plug.PlugConfig(vocab_size=512, num_encoder_layers=2, num_decoder_layers=2, embed_dim=64, num_heads=8,
                         mlp_dim=128, max_positions=32, type_vocab_size=3)

QKV = re.compile(r"(attention\.self\.query_key_value|decoder\.layer\.\d+\.attention\.query_key_value)\.")
COLUMN = re.compile(r"word_embeddings\.weight|decoder_weight|cls\.predictions\.bias|intermediate(\.dense)?\.|"
                    r"cross_attention\.query\.")
ROW = re.compile(r"(attention\.output\.dense|\d+\.output\.dense|attention\.dense|cross_attention\.dense|"
                 r"decoder\.layer\.\d+\.output)\.weight")


def release_split(state: dict, ranks: int) -> list[dict]:
  """Per-rank modules exactly as FORMATS.md describes PLUG's tensor-parallel layout."""
  modules = [{} for _ in range(ranks)]
  for key, x in state.items():
    if QKV.search(key) or "cross_attention.key_value." in key:
      parts = np.split(x, 3 if QKV.search(key) else 2)
      pieces = [np.concatenate([np.split(p, ranks)[r] for p in parts]) for r in range(ranks)]
    elif COLUMN.search(key):
      pieces = np.split(x, ranks, axis=0)
    elif ROW.search(key):
      pieces = np.split(x, ranks, axis=-1)
    else:
      pieces = [x] * ranks
    for module, piece in zip(modules, pieces):
      module[key] = torch.tensor(np.ascontiguousarray(piece))
  return modules


def write_release(directory, modules, tag="release"):
  (directory / tag).mkdir(parents=True)
  (directory / "latest").write_text(tag)
  for rank, module in enumerate(modules):
    torch.save({"module": module, "mp_world_size": len(modules)}, directory / tag / f"mp_rank_{rank:02d}_model_states.pt")
  return directory


def release_state(params: dict, config: plug.PlugConfig) -> dict[str, np.ndarray]:
  """The merged release state dict of `params`, written from FORMATS.md's key list without cpm_jax.convert: torch
  Linear weights are [out, in] (our kernels transposed, heads flattened), fused QKV rows Q, K, V (cross K, V)."""
  pre_ln = config.encoder_pre_ln

  def linear(kernel, in_dims):  # our [in..., out...] -> torch [out, in]
    rows = int(np.prod(kernel.shape[:in_dims]))
    return np.asarray(kernel).reshape(rows, -1).T

  def flat(bias):
    return np.asarray(bias).reshape(-1)

  def norm(key, p):
    return {f"{key}.weight": np.asarray(p["scale"]), f"{key}.bias": np.asarray(p["bias"])}

  def block(p, i):  # layer i of stacked block params
    return jax.tree.map(lambda x: np.asarray(x)[i], p)

  embed = params["embed"]
  state = {"bert.embeddings.word_embeddings.weight": np.asarray(embed["wte"]),
           "bert.embeddings.position_embeddings.weight": np.asarray(embed["wpe"]),
           "bert.embeddings.token_type_embeddings.weight": np.asarray(embed["wtt"]),
           **norm("bert.embeddings.LayerNorm", embed["ln"])}
  for i in range(config.num_encoder_layers):
    b, k = block(params["encoder"]["blocks"], i), f"bert.encoder.layer.{i}."
    state.update({
        **norm(k + ("attention.LayerNorm" if pre_ln else "attention.output.LayerNorm"), b["ln_1"]),
        k + "attention.self.query_key_value.weight": linear(b["attn"]["qkv_kernel"], 1),
        k + "attention.self.query_key_value.bias": flat(b["attn"]["qkv_bias"]),
        k + "attention.output.dense.weight": linear(b["attn"]["out_kernel"], 2),
        k + "attention.output.dense.bias": flat(b["attn"]["out_bias"]),
        **norm(k + ("LayerNorm" if pre_ln else "output.LayerNorm"), b["ln_2"]),
        k + "intermediate.dense.weight": linear(b["mlp"]["in_kernel"], 1),
        k + "intermediate.dense.bias": flat(b["mlp"]["in_bias"]),
        k + "output.dense.weight": linear(b["mlp"]["out_kernel"], 1),
        k + "output.dense.bias": flat(b["mlp"]["out_bias"])})
  if pre_ln:
    state.update(norm("bert.encoder.LayerNorm", params["encoder"]["ln_f"]))
  for i in range(config.num_decoder_layers):
    b, k = block(params["decoder"]["blocks"], i), f"decoder.decoder.layer.{i}."
    cross = b["cross_attn"]
    state.update({
        **norm(k + "input_layernorm", b["ln_1"]),
        k + "attention.query_key_value.weight": linear(b["self_attn"]["qkv_kernel"], 1),
        k + "attention.query_key_value.bias": flat(b["self_attn"]["qkv_bias"]),
        k + "attention.dense.weight": linear(b["self_attn"]["out_kernel"], 2),
        k + "attention.dense.bias": flat(b["self_attn"]["out_bias"]),
        **norm(k + "post_attention_layernorm", b["ln_2"]),
        k + "cross_attention.query.weight": linear(cross["q_kernel"], 1),
        k + "cross_attention.query.bias": flat(cross["q_bias"]),
        k + "cross_attention.key_value.weight": linear(cross["qkv_kernel"], 1),
        k + "cross_attention.key_value.bias": flat(cross["qkv_bias"]),
        k + "cross_attention.dense.weight": linear(cross["out_kernel"], 2),
        k + "cross_attention.dense.bias": flat(cross["out_bias"]),
        **norm(k + "post_cross_attention_layernorm", b["ln_3"]),
        k + "intermediate.weight": linear(b["mlp"]["in_kernel"], 1),
        k + "intermediate.bias": flat(b["mlp"]["in_bias"]),
        k + "output.weight": linear(b["mlp"]["out_kernel"], 1),
        k + "output.bias": flat(b["mlp"]["out_bias"])})
  if config.num_decoder_layers:
    state.update(norm("decoder.decoder.final_layernorm", params["decoder"]["ln_f"]))
  mlm = params["mlm"]
  state.update({"cls.predictions.transform.dense.weight": linear(mlm["dense_kernel"], 1),
                "cls.predictions.transform.dense.bias": flat(mlm["dense_bias"]),
                **norm("cls.predictions.transform.LayerNorm", mlm["ln"]),
                "cls.predictions.bias": flat(mlm["bias"]),
                "cls.predictions.decoder_weight": np.asarray(embed["wte"])})  # tied
  for key, group in (("bert.pooler.dense", "pooler"), ("cls.seq_relationship", "relation")):
    if group in params:
      state.update({f"{key}.weight": linear(params[group]["kernel"], 1), f"{key}.bias": flat(params[group]["bias"])})
  return state


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), plug.abstract_params(CONFIG))


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def test_release_shards_at_8_and_2_ranks_convert_to_identical_params(params, tmp_path):
  state = release_state(params, CONFIG)
  assert len(state) == 12 * 2 + 20 * 2 + 19  # encoder / decoder layers; embeddings, final LNs, heads, tied copy
  exported = convert_plug.state_from_params(params, CONFIG)  # the converter's own table agrees, key for key
  assert sorted(exported) == sorted(state)
  for key, array in state.items():
    np.testing.assert_array_equal(exported[key], array, err_msg=key)
  for ranks in (8, 2):
    modules = release_split(state, ranks)
    assert modules[0]["bert.embeddings.word_embeddings.weight"].shape == (512 // ranks, 64)
    loaded = convert_plug.load_deepspeed(write_release(tmp_path / f"mp{ranks}", modules), config=CONFIG)
    assert_same(loaded.params, params)
    assert loaded.config.param_dtype == "float32"


def test_export_splits_exactly_as_released_and_round_trips(params, tmp_path):
  out = convert_plug.save_deepspeed(params, CONFIG, tmp_path / "out", num_ranks=4)
  expected = release_split(release_state(params, CONFIG), 4)
  for rank in range(4):
    written = torch.load(out / "release" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)
    assert written["mp_world_size"] == 4
    assert sorted(written["module"]) == sorted(expected[rank])
    for key, tensor in expected[rank].items():
      torch.testing.assert_close(written["module"][key], tensor, rtol=0, atol=0, msg=key)
  assert_same(convert_plug.load_deepspeed(out, config=CONFIG).params, params)


def test_orbax_round_trip_onto_a_tensor_parallel_mesh(params, tmp_path):
  orbax.save_orbax(plug.FAMILY, params, CONFIG, tmp_path / "orbax", tokenizer="vocab.txt")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=1, tensor=8))
  loaded = orbax.load_orbax(plug.FAMILY, tmp_path / "orbax", mesh=mesh)
  assert loaded.config == CONFIG and loaded.metadata["tokenizer"] == "vocab.txt"
  assert loaded.params["embed"]["wte"].sharding.spec == partitioning.logical_to_spec(("vocab", "embed"))
  assert_same(loaded.params, params)
  # A given config is checked field by field; execution options (dtype, remat) may differ.
  with pytest.raises(ConversionError, match="layer_norm_eps: checkpoint 1e-05, given 1e-12"):
    orbax.load_orbax(plug.FAMILY, tmp_path / "orbax", config=dataclasses.replace(CONFIG, layer_norm_eps=1e-12))
  bf16 = orbax.load_orbax(plug.FAMILY, tmp_path / "orbax", config=dataclasses.replace(CONFIG, remat_policy="dots"),
                          dtype="bfloat16")
  assert bf16.config.remat_policy == "dots" and bf16.params["embed"]["wte"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(bf16.params["embed"]["wte"], params["embed"]["wte"].astype(jnp.bfloat16))


def test_bad_shards_fail_clearly_without_output(params, tmp_path):
  state = release_state(params, CONFIG)
  modules = release_split(state, 2)
  broken = write_release(tmp_path / "untied", [{**m, "cls.predictions.decoder_weight": m["cls.predictions.bias"][:, None]
                                                .expand(-1, 64).contiguous()} for m in modules])
  with pytest.raises(ConversionError, match="tied"):
    convert_plug.load_deepspeed(broken, config=CONFIG)
  with pytest.raises(ConversionError, match=r"unknown keys 'decoder\.decoder\.layer\.1\."):
    convert_plug.load_deepspeed(write_release(tmp_path / "deeper", modules),
                                config=plug.PlugConfig(**{**CONFIG.__dict__, "num_decoder_layers": 1}))
  with pytest.raises(ConversionError, match=r"word_embeddings.weight: shape \(512, 64\), expected \(256, 64\)"):
    convert_plug.load_deepspeed(tmp_path / "deeper", config=plug.PlugConfig(**{**CONFIG.__dict__, "vocab_size": 256}))
  missing = [{k: v for k, v in m.items() if "cross_attention.query" not in k} for m in modules]
  with pytest.raises(ConversionError, match="cross_attention.query"):
    convert_plug.load_deepspeed(write_release(tmp_path / "missing", missing), config=CONFIG)
  with pytest.raises(ConversionError, match="must divide num_heads=8"):
    convert_plug.save_deepspeed(params, CONFIG, tmp_path / "mp3", num_ranks=3)
  assert not (tmp_path / "mp3").exists()


def run_cli(*args):
  result = subprocess.run([sys.executable, str(ROOT / "experiments" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          check=False)
  return result.returncode, result.stdout + result.stderr


def test_command_line_release_to_orbax_to_shards_and_hf_bert(params, tmp_path):
  release = write_release(tmp_path / "release", release_split(release_state(params, CONFIG), 8))
  gin_file = tmp_path / "plug.gin"
  gin_file.write_text("".join(f"PlugConfig.{name} = {getattr(CONFIG, name)}\n" for name in (
      "vocab_size", "num_encoder_layers", "num_decoder_layers", "embed_dim", "num_heads", "mlp_dim", "max_positions",
      "type_vocab_size")))
  # A gin PlugConfig makes it PLUG; the Orbax output then names the model, so --to=megatron needs no --model.
  code, out = run_cli("--from=megatron", f"--input={release}", f"--output={tmp_path / 'orbax'}",
                      f"--gin_file={gin_file}", "--mesh_tensor=8", "--tokenizer=vocab.txt")
  assert code == 0, out
  loaded = orbax.load_orbax(plug.FAMILY, tmp_path / "orbax")
  assert loaded.metadata["tokenizer"] == "vocab.txt" and loaded.metadata["converted_from"]["format"] == "megatron"
  assert_same(loaded.params, params)
  code, out = run_cli(f"--input={tmp_path / 'orbax'}", f"--output={tmp_path / 'mp2'}", "--to=megatron", "--mp=2")
  assert code == 0, out
  for rank, want in enumerate(release_split(release_state(params, CONFIG), 2)):
    got = torch.load(tmp_path / "mp2" / "release" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)
    assert sorted(got["module"]) == sorted(want)
    for key, tensor in want.items():
      torch.testing.assert_close(got["module"][key], tensor, rtol=0, atol=0, msg=key)

  # What PLUG cannot do fails before anything is written; so does a BERT import without its encoder config.
  code, out = run_cli(f"--input={tmp_path / 'orbax'}", f"--output={tmp_path / 'hf'}", "--to=hf")
  assert code != 0 and "--to=hf is not available for plug checkpoints" in out
  code, out = run_cli("--model=plug", "--from=hf", f"--input={tmp_path}", f"--output={tmp_path / 'bert'}")
  assert code != 0 and "needs the model's config" in out
  code, out = run_cli("--model=cpm", f"--input={tmp_path / 'orbax'}", f"--output={tmp_path / 'cpm'}")
  assert code != 0 and "holds a 'plug' checkpoint" in out
  assert not any((tmp_path / name).exists() for name in ("hf", "bert", "cpm"))


def test_command_line_hugging_face_bert_to_encoder_gives_its_logits(tmp_path):
  """transformers' BertForMaskedLM (every weight random, LayerNorms included) -> the CLI -> our encoder + MLM head:
  the same logits on the same tokens and token types."""
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
                                      layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  bert = transformers.BertForMaskedLM(hf_config).eval()
  with torch.no_grad():
    for name, param in bert.named_parameters():
      param.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.2 if "LayerNorm" in name else 0.3)
  bert.save_pretrained(tmp_path / "bert")
  gin_file = tmp_path / "bert.gin"
  sizes = dict(vocab_size=64, num_encoder_layers=2, num_decoder_layers=0, embed_dim=16, num_heads=2, mlp_dim=32,
               max_positions=32, type_vocab_size=2, encoder_pre_ln=False, num_relations=0, layer_norm_eps=1e-12,
               dropout_rate=0.0)
  gin_file.write_text("".join(f"PlugConfig.{name} = {value}\n" for name, value in sizes.items()))
  code, out = run_cli("--model=plug", "--from=hf", f"--input={tmp_path / 'bert'}", f"--output={tmp_path / 'orbax'}",
                      f"--gin_file={gin_file}")
  assert code == 0, out
  loaded = orbax.load_orbax(plug.FAMILY, tmp_path / "orbax")
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  token_types = (np.arange(12) >= 5).astype(np.int64)[None].repeat(2, 0)
  with torch.no_grad():
    want = bert(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(token_types)).logits.numpy()
  hidden = plug.encode(loaded.params, jnp.asarray(tokens, jnp.int32), loaded.config,
                       token_types=jnp.asarray(token_types, jnp.int32))
  got = np.asarray(plug.mlm_logits(loaded.params, hidden, loaded.config))
  assert np.abs(want).max() > 1.0  # logits far from uniform: the weights matter
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
