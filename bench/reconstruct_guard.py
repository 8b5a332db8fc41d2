"""Can a run tell, without labels, whether its rounding reconstruction helped? For finished cycle
workdirs (with `config.reconstruct.enabled`), redo the reconstruction from the saved state, then
compare, before and after it, the KL(float || quantized) of the logits on (a) the images it was
fitted on and (b) a fresh generation from another seed (held-out generated images), against the
change of top-1 on held-in training images (bench/lowbit.py's, never the test split).

  python bench/reconstruct_guard.py --workdirs=runs/w2a8_rec/w2a8_clamp_search_s0,...
"""

import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowbit  # noqa: E402  (held-in images and top-1)
from finished_run import run_config  # noqa: E402
from clamp_jax.generate import generate  # noqa: E402
from clamp_jax.models import build_model  # noqa: E402
from clamp_jax.models.checkpoints import load_checkpoint  # noqa: E402
from clamp_jax.models.reparam import fold  # noqa: E402
from clamp_jax.pipeline import generation_config  # noqa: E402
from clamp_jax.run_state import RunCheckpoints  # noqa: E402
from clamp_jax.search.reconstruct import reconstruct, reconstruct_config  # noqa: E402

flags.DEFINE_list("workdirs", [], "finished cycle workdirs")
flags.DEFINE_integer("fresh_seed", 1000, "added to the run's generate.seed for the fresh images")
FLAGS = flags.FLAGS


def kl(model, params, qparams, images):
  """Mean KL(float || quantized) of the logits on `images`."""
  fp = jax.nn.log_softmax(model.apply({"params": params}, images))
  q = jax.nn.log_softmax(model.apply({"params": params, "quant": qparams}, images))
  return float(jnp.mean(jnp.sum(jnp.exp(fp) * (fp - q), -1)))


def main(_):
  lowbit.row(["workdir", "KL fit before", "after", "KL fresh before", "after",
              "held-in top-1 before", "after"])
  lowbit.row(["---"] * 7)
  for workdir in FLAGS.workdirs:
    config = run_config(workdir)
    model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
    model = build_model(model_cfg)
    checkpoints = RunCheckpoints(os.path.join(workdir, "state"))
    state = checkpoints.latest()
    checkpoints.close()
    fresh_config = config.copy_and_resolve_references()
    fresh_config.generate.seed = config.generate.seed + FLAGS.fresh_seed
    fresh = generate(generation_config(fresh_config), model, params, None)[0]
    folded = fold(params, state.reparam)
    rec_cfg = reconstruct_config(**config.reconstruct.to_dict())  # fields added since: defaults
    rounded, qparams, _ = reconstruct(model, folded, state.qparams, state.images, rec_cfg)
    images, labels = lowbit.eval_images(config)
    cells = []
    for x in (state.images, fresh):
      cells += [kl(model, p, q, x) for p, q in ((folded, state.qparams), (rounded, qparams))]
    cells += [lowbit.top1(model, p, q, images, labels)
              for p, q in ((folded, state.qparams), (rounded, qparams))]
    lowbit.row([workdir] + [f"{c:.4f}" for c in cells[:4]] + [f"{c:.2f}" for c in cells[4:]])


if __name__ == "__main__":
  app.run(main)
