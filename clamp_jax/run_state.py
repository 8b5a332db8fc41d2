"""What a quantization run needs to continue after any block, checkpointed atomically with orbax.

A step is the number of blocks of the search order done (0: after calibration, before the
search). orbax writes each step into a temporary folder and renames it when complete, so a run
killed at any moment leaves the previous step intact; the two newest steps are kept.
"""

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from clamp_jax.generate import GenState
from clamp_jax.quant import params as qparams_lib


@dataclasses.dataclass
class RunState:
  """The quantization run between blocks."""
  position: int                 # blocks of the search order done
  qparams: dict                 # the current QuantParams
  images: Any                   # the current calibration images [N, H, W, C]
  gen_state: Optional[GenState]  # the generator, for warm-started refreshes (generated sources)
  history: list                 # one entry per block done
  info: dict                    # what the start measured (calibration seconds, generation report)
  reparam: dict = dataclasses.field(default_factory=dict)  # LayerNorm folds (models.reparam)


class RunCheckpoints:
  """`save` / `latest` of `RunState`s under `directory`."""

  def __init__(self, directory: str):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), item_names=("arrays", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))

  def save(self, state: RunState) -> None:
    q_arrays, sites = qparams_lib.split(state.qparams)
    arrays = dict(qparams=q_arrays, images=np.asarray(state.images))
    if state.reparam:
      arrays["reparam"] = state.reparam
    if state.gen_state is not None:
      arrays["gen_params"] = jax.device_get(state.gen_state.gen_params)
      arrays["targets"] = np.asarray(state.gen_state.targets)
    meta = dict(position=state.position, sites=sites, history=state.history, info=state.info,
                has_generator=state.gen_state is not None)
    self.manager.save(state.position, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def latest(self) -> Optional[RunState]:
    """The newest complete step, or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    arrays, meta = restored["arrays"], restored["meta"]
    gen_state = None
    if meta["has_generator"]:
      gen_state = GenState(arrays["gen_params"], arrays["targets"])
    return RunState(meta["position"], qparams_lib.join(arrays["qparams"], meta["sites"]),
                    arrays["images"], gen_state, meta["history"], meta["info"],
                    arrays.get("reparam", {}))

  def close(self) -> None:
    self.manager.close()
