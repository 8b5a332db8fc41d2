"""The CLAMP method on a Swin through the model protocol: each stage's grid in the generator's
losses, Fisher weights by block name, block-cached search scores, the budget's MACs of a window
block and a patch merge, mixed precision, export, and the launch.py cycle (kill, resume, eval)."""

import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clamp_jax import generate as gen
from clamp_jax.models import build_model, swin_config
from clamp_jax.models.checkpoints.swin_timm import save_timm_swin
from clamp_jax.models.protocol import BlockGrid
from clamp_jax.models.quantized import export_integer, load_quantized, quant_config
from clamp_jax.models.reparam import calibrate_model
from clamp_jax.quant.params import WEIGHT, flatten, unflatten
from clamp_jax.search import BlockEvaluator, Budget, EvolQ, search, search_config, with_block
from clamp_jax.search.budget import costs, report
from clamp_jax.search.evaluator import block_sites, fisher_weights
from clamp_jax.search.fitness import Fitness
from clamp_jax.search.strategy import take
from conftest import launch, launch_env, read_json
from test_pipeline import (assert_same_npz, assert_same_quant_params, complete_steps, final_state,
                           kill_after_blocks)

# configs/fmnist_swin.py:tiny: a 14x14 grid (window 7, stage 1 shifted every second block), then
# 7x7 (one window, never shifted); widths 8 and 16.
SHAPE = dict(image_size=28, channels=1, patch_size=2, embed_dim=8, depths=(2, 2),
             num_heads=(2, 2), window_size=7, mlp_ratio=2.0, num_classes=10)
SMALL = dict(passes=1, generations=2, population=4, children=4, tournament=3, block_tokens=24)


def random_swin(seed=0):
  """`(cfg, model, params)`: the tiny Swin with every parameter N(0, 0.3^2)."""
  cfg = swin_config(**SHAPE)
  model = build_model(cfg)
  dummy = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)
  return cfg, model, params


@pytest.fixture(scope="module")
def setup():
  """`(cfg, model, params, images, qparams)`: W4/A8 (reparameterized) on 4 random images."""
  cfg, model, params = random_swin()
  images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 28, 28, 1)), jnp.float32)
  params, qparams, _ = calibrate_model(model, params, images, quant_config(w_bits=4, a_bits=8))
  return cfg, model, params, images, qparams


def test_swin_configs_are_swins_with_the_papers_generator_learning_rate():
  from configs import fmnist_swin, fmnist_vit, swin_b, swin_s, swin_t
  for module, depths in ((swin_t, (2, 2, 6, 2)), (swin_s, (2, 2, 18, 2)), (swin_b, (2, 2, 18, 2))):
    config = module.get_config("w4a8")
    assert (config.model.family, config.model.depths, config.data.preset) == ("swin", depths, "deit")
    assert (config.generate.lr, config.generate.steps, config.search.passes) == (0.25, 500, 10)
    assert not module.get_config("minmax").search.enabled and module.get_config("mp").quant.mixed
  model = fmnist_swin.get_config().model
  assert (model.image_size, model.channels, model.patch_size, model.embed_dim, model.depths,
          model.num_heads, model.window_size, model.mlp_ratio, model.num_classes) == \
      (28, 1, 2, 48, (2, 2), (3, 6), 7, 4.0, 10)
  small = fmnist_swin.get_config("tiny,mp")
  assert (small.model.embed_dim, small.generate.lr, small.quant.mixed) == (8, 0.25, True)
  assert fmnist_vit.get_config().generate.lr == 0.2  # the ViT's stays


def test_block_grids_follow_the_stages():
  _, model, _ = random_swin()
  assert model.num_layers == 4
  assert model.block_grids(28) == (BlockGrid((14, 14)),) * 2 + (BlockGrid((7, 7)),) * 2
  assert model.block_grids(30)[2:] == (BlockGrid((8, 8)),) * 2  # 15 -> 8: merging pads


def test_budget_counts_a_window_block_and_a_patch_merge_by_hand(setup):
  *_, qparams = setup
  assert report(qparams) == dict(size_vs_w4a8=1.0, bops_vs_w4a8=1.0)

  def count(prefix):
    sites = {p: s for p, s in flatten(qparams).items() if p.startswith(prefix)}
    return costs(unflatten(sites))

  # Block 1: 196 tokens (4 windows of 49, shifted), width 8, MLP 16.
  block_params = 4 * 8 * 8 + 2 * 8 * 16
  np.testing.assert_array_equal(count("Transformer/encoderblock_1/"),
                                [block_params * 4, 196 * block_params * 4 * 8])
  # The merge before stage 2: 49 tokens of 4 x 8 channels reduced to 16, no bias.
  np.testing.assert_array_equal(count("Transformer/downsample_1/"),
                                [32 * 16 * 4, 49 * 32 * 16 * 4 * 8])
  assert "Transformer/downsample_1/merge_ln" in flatten(qparams)  # the reduction's input
  attn = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/"
  for site in ("q", "attn_probs", "attn_v"):  # window tensors [B, windows, ...]: per tensor
    assert flatten(qparams)[attn + site].scale.shape == (), site


def test_generator_losses_read_each_block_on_its_stages_grid(setup):
  _, model, params, images, qparams = setup
  config = ml_collections.ConfigDict(dict(model=swin_config(**SHAPE),
                                          generate=gen.generate_config()))
  loss_fn = jax.jit(gen.make_loss(config, model))
  _, terms = loss_fn(images, images, jnp.zeros(4, jnp.int32), params, qparams)
  _, fp = model.apply({"params": params}, images, return_intermediates=True)
  _, q = model.apply({"params": params, "quant": qparams}, images, return_intermediates=True)
  grids = [(14, 14), (14, 14), (7, 7), (7, 7)]
  per_block = [gen.patch_contrastive_loss(q["attn"][l], fp["attn"][l], grid)
               for l, grid in enumerate(grids)]
  np.testing.assert_allclose(terms["contrast"], np.mean(per_block), rtol=1e-5)
  assert np.ptp(per_block) > 0  # the blocks differ, so the mean is over all four
  config.generate.update(method="psaq")
  _, terms = jax.jit(gen.make_loss(config, model))(images, images, jnp.zeros(4, jnp.int32),
                                                   params, qparams)
  want = sum(gen.patch_similarity_entropy(fp["attn"][l]) for l in range(4))
  np.testing.assert_allclose(terms["pse"], want, rtol=1e-4)


def test_fisher_weights_intercept_the_blocks_by_name(setup):
  _, model, params, images, _ = setup
  logits, inter = model.apply({"params": params}, images, return_intermediates=True)
  got = fisher_weights(model, params, images)
  assert [g.shape for g in got] == [b.shape for b in inter["block"]]
  labels = jnp.argmax(logits, axis=-1)

  def cross_entropy(stream):  # block 2's output enters block 3
    out = model.apply({"params": params}, stream, start_block=3)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], axis=-1))

  np.testing.assert_allclose(got[2], jax.grad(cross_entropy)(inter["block"][2]) ** 2,
                             rtol=1e-4, atol=1e-10)
  assert all(float(jnp.max(g)) > 0 for g in got)


def test_block_cached_scores_equal_the_whole_model_in_each_stage(setup):
  _, model, params, images, qparams = setup
  cfg = search_config(**SMALL)
  evaluator = BlockEvaluator(model, params, cfg)
  caches = evaluator.caches(qparams, images)
  fp_logits, fp = model.apply({"params": params}, images, return_intermediates=True)
  for block in (1, 2):  # the shifted block of stage 1; the first block after the merge
    sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, block)
    assert int(sample.max()) < 4 * (196 if block < 2 else 49)
    population = EvolQ(population_size=3).initial_population(jax.random.PRNGKey(block),
                                                             block_sites(qparams, block))
    scores = evaluator.score(block, population, qparams, caches, sample)
    for i in range(3):
      q = with_block(qparams, block, take(population, i))
      logits, inter = model.apply({"params": params, "quant": q}, images,
                                  return_intermediates=True)
      want = Fitness.from_config(cfg)(inter["block"][block], fp["block"][block], logits,
                                      fp_logits, sample)
      np.testing.assert_allclose(scores[i], want, rtol=1e-5, err_msg=f"block {block}")


def test_mixed_precision_keeps_the_budget(setup):
  _, model, params, images, _ = setup
  qcfg = quant_config(w_bits=4, a_bits=8, mixed=True, budget=0.85, budget_kind="both")
  qparams = calibrate_model(model, params, images, qcfg)[1]
  result, history = search(model, params, qparams, images, search_config(**SMALL),
                           quant_cfg=qcfg)
  assert [h["block"] for h in history] == [3, 2, 1, 0]
  assert all(max(h["size_vs_w4a8"], h["bops_vs_w4a8"]) <= 0.85 for h in history)
  assert Budget.of(qparams, 0.85, "both").allows(result)
  bits = {float(s.bits) for p, s in flatten(result).items() if "/encoderblock_" in p
          and s.kind == WEIGHT}
  assert min(bits) < 4  # lowered into the budget


def test_export_loads_back_to_the_same_quantized_model(setup, tmp_path):
  cfg, model, params, images, qparams = setup
  path = str(tmp_path / "quantized.npz")
  np.savez(path, **export_integer(params, qparams))
  loaded_cfg, loaded, loaded_q = load_quantized(path, swin_config(image_size=28))
  assert {f: loaded_cfg[f] for f in SHAPE} == SHAPE  # the shape read from the export
  table = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/relative_position_bias_table"
  flat = flax.traverse_util.flatten_dict(loaded, sep="/")
  original = flax.traverse_util.flatten_dict(params, sep="/")
  np.testing.assert_array_equal(flat[table], original[table])  # a float parameter, as it was
  want = model.apply({"params": params, "quant": qparams}, images)
  got = build_model(loaded_cfg).apply({"params": loaded, "quant": loaded_q}, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- launch.py: the cycle, killed and resumed, and --mode=eval of the export ---------------------

NUM_EVAL = 100
NUM_BLOCKS = 8  # 2 passes over 4 blocks
KILL_AFTER = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random tiny Swin as a timm (>= 0.9) .safetensors file."""
  path = str(tmp_path_factory.mktemp("checkpoint") / "swin.safetensors")
  save_timm_swin(path, random_swin(seed=2)[2])
  return path


def cycle_args(checkpoint, workdir):
  """Generated images refreshed every generation, 2 passes, then the rounding reconstruction
  (the head too, and the kernels' steps learned: the export must carry them)."""
  return ["--config=configs/fmnist_swin.py:tiny,w3a4", f"--workdir={workdir}",
          f"--config.model.checkpoint={checkpoint}", f"--config.eval.num_images={NUM_EVAL}",
          "--config.search.passes=2", "--config.search.refresh_every=1",
          "--config.reconstruct.enabled=True", "--config.reconstruct.head=True",
          "--config.reconstruct.w_scale_lr=1e-3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint, env):
  workdir = str(tmp_path_factory.mktemp("reference"))
  launch(*cycle_args(checkpoint, workdir), env=env)
  return workdir


def test_killed_swin_run_resumes_to_the_same_result(tmp_path, checkpoint, env, reference):
  workdir = str(tmp_path / "killed")
  args = cycle_args(checkpoint, workdir)
  kill_after_blocks(args, workdir, env, tmp_path / "killed.log", KILL_AFTER)
  steps = complete_steps(workdir)
  assert KILL_AFTER <= max(steps) < NUM_BLOCKS
  resumed = launch(*args, env=env)
  assert f"resuming {workdir} after {max(steps)} blocks" in resumed.stderr
  assert_same_quant_params(workdir, reference)
  assert_same_npz(os.path.join(workdir, "quantized.npz"),
                  os.path.join(reference, "quantized.npz"))
  assert final_state(workdir).position == NUM_BLOCKS
  results, expected = (read_json(os.path.join(d, "results.json")) for d in (workdir, reference))
  for key in ("quant_top1", "minmax_top1", "before_reconstruct_top1", "reconstruct",
              "size_vs_w4a8", "bops_vs_w4a8"):
    assert results[key] == expected[key], key
  assert [(h["pass_"], h["block"]) for h in results["search_history"]] == \
      [(p, b) for p in range(2) for b in (3, 2, 1, 0)]
  assert [h["block"] for h in results["reconstruct"]] == ["embedding", 0, 1, 2, 3, "head"]


def test_swin_export_evaluates_to_the_run_top1(tmp_path, checkpoint, env, reference):
  out = launch("--config=configs/fmnist_swin.py:tiny,w3a4", "--mode=eval",
               f"--workdir={tmp_path}", f"--config.model.quantized={reference}/quantized.npz",
               f"--config.eval.num_images={NUM_EVAL}", env=env)
  evaluated = read_json(os.path.join(tmp_path, "eval.json"))
  results = read_json(os.path.join(reference, "results.json"))
  assert evaluated["n"] == results["n"] == NUM_EVAL
  assert evaluated["top1"] == results["quant_top1"]
  assert f"quantized top-1: {evaluated['top1']:.2f}%" in out.stdout


def test_a_swin_file_of_another_shape_evaluates_with_only_the_checkpoint_flag(tmp_path, checkpoint):
  out = launch("--config=configs/fmnist_swin.py", "--mode=eval", f"--workdir={tmp_path}",
               f"--config.model.checkpoint={checkpoint}", env=launch_env(optimize=True))
  evaluated = read_json(os.path.join(tmp_path, "eval.json"))
  recorded = read_json(os.path.join(tmp_path, "config.json"))["model"]
  assert evaluated["n"] == 10000 and 0 <= evaluated["top1"] <= 100
  assert (recorded["embed_dim"], recorded["num_heads"]) == (SHAPE["embed_dim"],
                                                           list(SHAPE["num_heads"]))
  assert f"float top-1: {evaluated['top1']:.2f}%" in out.stdout
