"""timm Swin Transformer checkpoints <-> our Swin names (`clamp_jax/models/swin.py`).

Two layouts exist, told apart by the file:
- "new" (timm >= 0.9): `layers.{s}.downsample.*` at the START of stages s >= 1, `head.fc.*`;
- "old" (older timm, the original release): `layers.{s}.downsample.*` at the END of stages
  s < last, `head.*`, and the buffers `attn.relative_position_index` / `attn_mask` (ignored).
Either may sit under a top-level `model` key (flat names `model.*`).

Neither stores the number of heads, window or MLP ratio as such: they are read from the shapes
of each stage's `relative_position_bias_table` `((2w - 1)^2, heads)` and `mlp.fc1.weight`.
"""

import re
from typing import Collection, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.files import atomic_path
from clamp_jax.models.checkpoints.loader import (CheckpointError, CheckpointMismatchError,
                                                 check_against, read_flat)
from clamp_jax.models.swin import (SHAPE_FIELDS, block_stages, build_swin, relative_position_index,
                                   shifted_window_mask, stage_grids, stage_window)

Flat = Dict[str, np.ndarray]
NEW, OLD = "new", "old"

_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
_TABLE = "attn.relative_position_bias_table"
_BUFFERS = ("relative_position_index", "attn_mask")  # timm's non-persistent buffers
_ATTN = "MultiHeadDotProductAttention_0"

# timm name -> ours, for 1-D tensors and Linear weights (transposed).
_IN_BLOCK = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
    _TABLE: f"{_ATTN}/relative_position_bias_table",
}
_IN_DOWNSAMPLE = {"norm.weight": "norm/scale", "norm.bias": "norm/bias",
                  "reduction.weight": "reduction/kernel"}
_TOP = {
    "patch_embed.proj.weight": "embedding/kernel", "patch_embed.proj.bias": "embedding/bias",
    "patch_embed.norm.weight": "embedding_norm/scale",
    "patch_embed.norm.bias": "embedding_norm/bias",
    "norm.weight": "Transformer/encoder_norm/scale", "norm.bias": "Transformer/encoder_norm/bias",
}
_HEAD = {NEW: {"head.fc.weight": "head/kernel", "head.fc.bias": "head/bias"},
         OLD: {"head.weight": "head/kernel", "head.bias": "head/bias"}}


def _strip(flat: Flat) -> Flat:
  """Drops a `model.` / `module.` prefix (a state dict nested under `model`, DDP). A file with a
  `model` entry keeps only it (like timm's `state_dict.get('model', state_dict)`: a training
  checkpoint's optimizer state is not the model's)."""
  if any(k.startswith("model.") for k in flat):
    flat = {k: v for k, v in flat.items() if k.startswith("model.")}
  out = {}
  for key, value in flat.items():
    for prefix in ("model.", "module."):
      key = key[len(prefix):] if key.startswith(prefix) else key
    out[key] = value
  return out


def is_timm_swin(flat: Flat) -> bool:
  """Whether `flat` holds timm Swin names: `layers.S.blocks.J.attn.relative_position_bias_table`."""
  return any(re.fullmatch(r"layers\.\d+\.blocks\.\d+\." + re.escape(_TABLE), k)
             for k in _strip(flat))


def _need(flat: Flat, key: str) -> np.ndarray:
  if key not in flat:
    raise CheckpointMismatchError(f"checkpoint is missing {key!r}, needed to read the model shape")
  return np.asarray(flat[key])


def _depths(flat: Flat) -> Tuple[int, ...]:
  """Blocks per stage, from the block names; stages and blocks must be numbered 0..n-1."""
  blocks = {}
  for key in flat:
    m = _BLOCK.fullmatch(key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if not blocks:
    raise CheckpointMismatchError("checkpoint has no blocks (layers.S.blocks.J.*)")
  depths = []
  for s in range(max(blocks) + 1):
    found = blocks.get(s, set())
    if found != set(range(len(found))) or not found:
      raise CheckpointMismatchError(f"stage {s} of the checkpoint has blocks {sorted(found)}: "
                                    f"expected 0..n-1")
    depths.append(len(found))
  return tuple(depths)


def timm_layout(flat: Flat) -> str:
  """"new" (timm >= 0.9) or "old" (downsample at the end of a stage, `head.weight`)."""
  flat = _strip(flat)
  last = len(_depths(flat)) - 1
  merges = {int(m.group(1)) for k in flat for m in [_DOWNSAMPLE.fullmatch(k)] if m}
  votes = set()
  if "head.fc.weight" in flat or "head.fc.bias" in flat:
    votes.add(NEW)
  if "head.weight" in flat or "head.bias" in flat:
    votes.add(OLD)
  if 0 in merges:
    votes.add(OLD)
  if last > 0 and last in merges:
    votes.add(NEW)
  if len(votes) > 1:
    raise CheckpointMismatchError(
        f"checkpoint mixes timm Swin layouts: head names "
        f"{sorted(k for k in flat if k.startswith('head'))}, downsample in stages "
        f"{sorted(merges)} of 0..{last}")
  return votes.pop() if votes else NEW


def _stage_tables(flat: Flat, depths) -> Tuple[Tuple[int, int], ...]:
  """`(window, heads)` of each stage, from its first block's bias table."""
  out = []
  for s in range(len(depths)):
    rows, heads = _need(flat, f"layers.{s}.blocks.0.{_TABLE}").shape
    side = int(round(np.sqrt(rows)))
    if side * side != rows or side % 2 == 0:
      raise CheckpointMismatchError(f"layers.{s}.blocks.0.{_TABLE} has {rows} rows: not "
                                    f"(2 w - 1)^2 for a square window w")
    out.append(((side + 1) // 2, int(heads)))
  return tuple(out)


def infer_swin_shape(flat: Flat) -> Dict:
  """The config fields a timm Swin checkpoint determines (`swin.SHAPE_FIELDS`).

  The window is the largest of the stages' (a stage whose grid is smaller than the window has a
  smaller table); the MLP ratio is `fc1` rows / width of the first block.
  """
  flat = _strip(flat)
  embed_dim, channels, patch, _ = _need(flat, "patch_embed.proj.weight").shape
  depths = _depths(flat)
  tables = _stage_tables(flat, depths)
  hidden = _need(flat, "layers.0.blocks.0.mlp.fc1.weight").shape[0]
  head = "head.fc.weight" if timm_layout(flat) == NEW else "head.weight"
  return dict(channels=int(channels), patch_size=int(patch), embed_dim=int(embed_dim),
              depths=depths, num_heads=tuple(h for _, h in tables),
              window_size=max(w for w, _ in tables), mlp_ratio=float(hidden / embed_dim),
              num_classes=int(_need(flat, head).shape[0]))


def swin_from_timm(flat: Flat) -> Flat:
  """A timm Swin state dict (either layout, PyTorch layouts) -> our flat names and layouts.

  Buffers are dropped; names without a counterpart are kept as they are, so the loader reports
  them as unexpected.
  """
  flat = _strip(flat)
  layout, depths = timm_layout(flat), _depths(flat)
  starts = np.cumsum((0,) + depths)
  heads = [h for _, h in _stage_tables(flat, depths)]
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    block, merge = _BLOCK.fullmatch(key), _DOWNSAMPLE.fullmatch(key)
    if key.endswith(_BUFFERS):
      continue
    if key in _TOP or key in _HEAD[layout]:
      name = {**_TOP, **_HEAD[layout]}[key]
      if key == "patch_embed.proj.weight":
        value = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
      out[name] = value.T if value.ndim == 2 else value
    elif merge and merge.group(2) in _IN_DOWNSAMPLE:
      stage = int(merge.group(1)) + (1 if layout == OLD else 0)
      out[f"Transformer/downsample_{stage}/{_IN_DOWNSAMPLE[merge.group(2)]}"] = value.T
    elif block:
      s, j, name = int(block.group(1)), int(block.group(2)), block.group(3)
      prefix = f"Transformer/encoderblock_{starts[s] + j}"
      if name in _IN_BLOCK:
        value = value.T if value.ndim == 2 and name != _TABLE else value
        out[f"{prefix}/{_IN_BLOCK[name]}"] = value
      elif name in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"):
        out.update(_attention_from_timm(f"{prefix}/{_ATTN}", name, value, heads[s]))
      else:
        out[key] = value
    else:
      out[key] = value
  return out


def _attention_from_timm(prefix: str, name: str, value: np.ndarray, heads: int) -> Flat:
  """Fused `qkv` `(3A, D)` -> query/key/value `(D, heads, A/heads)`; `proj` `(D, A)` -> out
  `(heads, A/heads, D)`."""
  if name == "attn.proj.weight":
    return {f"{prefix}/out/kernel": value.T.reshape(heads, -1, value.shape[0])}
  if name == "attn.proj.bias":
    return {f"{prefix}/out/bias": value}
  if value.shape[0] % (3 * heads):
    raise CheckpointMismatchError(f"{prefix} {name} has shape {value.shape}: the fused qkv needs "
                                  f"a first axis of 3 x {heads} heads x head_dim")
  out = {}
  for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
    if name == "attn.qkv.weight":  # (A, D) -> (D, heads, head_dim)
      out[f"{prefix}/{part}/kernel"] = chunk.T.reshape(chunk.shape[1], heads, -1)
    else:
      out[f"{prefix}/{part}/bias"] = chunk.reshape(heads, -1)
  return out


def _our_depths(flat: Flat) -> Tuple[int, ...]:
  """Blocks per stage of our flat params: consecutive blocks of one width form a stage."""
  widths = []
  while f"Transformer/encoderblock_{len(widths)}/LayerNorm_0/scale" in flat:
    widths.append(flat[f"Transformer/encoderblock_{len(widths)}/LayerNorm_0/scale"].shape[0])
  depths = []
  for i, width in enumerate(widths):
    if i and width == widths[i - 1]:
      depths[-1] += 1
    else:
      depths.append(1)
  return tuple(depths)


def swin_to_timm(flat: Flat, layout: str = NEW, image_size: Optional[int] = None) -> Flat:
  """Our flat Swin params -> a timm state dict of `layout` ("new" or "old").

  "old" also writes the buffers older timm saved: every block's `attn.relative_position_index`
  and the shifted blocks' `attn_mask`, whose shape depends on the grid, so it needs `image_size`.
  """
  if layout not in (NEW, OLD):
    raise ValueError(f"layout must be {NEW!r} or {OLD!r}, got {layout!r}")
  if layout == OLD and not image_size:
    raise ValueError("layout 'old' writes attn_mask buffers: give the image_size")
  f = {k: np.asarray(v) for k, v in flat.items()}
  depths = _our_depths(f)
  sd = {timm: f[ours] for timm, ours in {**_TOP, **_HEAD[layout]}.items()}
  sd = {k: (v.T if v.ndim == 2 else v) for k, v in sd.items()}
  sd["patch_embed.proj.weight"] = f["embedding/kernel"].transpose(3, 2, 0, 1)
  for s in range(1, len(depths)):
    stage = s - 1 if layout == OLD else s
    for timm, ours in _IN_DOWNSAMPLE.items():
      sd[f"layers.{stage}.downsample.{timm}"] = f[f"Transformer/downsample_{s}/{ours}"].T
  for i, (s, j) in enumerate(block_stages(depths)):
    b = f"Transformer/encoderblock_{i}/"
    t = f"layers.{s}.blocks.{j}."
    for timm, ours in _IN_BLOCK.items():
      v = f[b + ours]
      sd[t + timm] = v.T if v.ndim == 2 and timm != _TABLE else v
    att = b + _ATTN + "/"
    q = f[att + "query/kernel"]
    d = q.shape[0]
    sd[t + "attn.qkv.weight"] = np.concatenate(
        [f[att + p + "/kernel"].reshape(d, -1).T for p in ("query", "key", "value")])
    sd[t + "attn.qkv.bias"] = np.concatenate(
        [f[att + p + "/bias"].reshape(-1) for p in ("query", "key", "value")])
    sd[t + "attn.proj.weight"] = f[att + "out/kernel"].reshape(-1, d).T
    sd[t + "attn.proj.bias"] = f[att + "out/bias"]
  if layout == OLD:
    sd.update(_old_buffers(f, depths, image_size))
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _old_buffers(f: Flat, depths, image_size: int) -> Flat:
  """`relative_position_index` of every block, `attn_mask` of the shifted ones (older timm)."""
  patch = f["embedding/kernel"].shape[0]
  rows = [f[f"Transformer/encoderblock_{i}/{_IN_BLOCK[_TABLE]}"].shape[0]
          for i in range(sum(depths))]
  window = max((int(round(np.sqrt(r))) + 1) // 2 for r in rows)
  grids = stage_grids((image_size // patch,) * 2, depths)
  out = {}
  for i, (s, j) in enumerate(block_stages(depths)):
    grid = grids[i]
    win, shift = stage_window(grid, window, shifted=j % 2 == 1)
    out[f"layers.{s}.blocks.{j}.attn.relative_position_index"] = (
        relative_position_index(win).astype(np.int64))
    padded = tuple(-(-r // w) * w for r, w in zip(grid, win))
    mask = shifted_window_mask(padded, win, shift)
    if mask is not None:
      out[f"layers.{s}.blocks.{j}.attn_mask"] = mask
  return out


def _with_shape(cfg: ml_collections.ConfigDict, shape: Dict, path: str,
                pinned: Collection[str]) -> ml_collections.ConfigDict:
  """A copy of `cfg` with the file's shape; a field named in `pinned` that differs stops with
  `CheckpointError` naming both values."""
  clashes = []
  for field in set(SHAPE_FIELDS) & set(pinned):
    given, found = cfg.get(field), shape[field]
    same = (np.isclose(float(given), found) if field == "mlp_ratio" else
            tuple(given) == found if isinstance(found, tuple) else given == found)
    if not same:
      clashes.append(f"config.model.{field}={given!r} but the file holds {found!r}")
  if clashes:
    raise CheckpointError(f"{path}: {'; '.join(sorted(clashes))} (drop the override: the file "
                          f"decides)")
  fields = cfg.to_dict()
  fields.update(shape)
  return ml_collections.ConfigDict(fields)


def _read_timm_swin(path: str) -> Flat:
  raw = read_flat(path)
  if not is_timm_swin(raw):
    raise CheckpointError(f"{path} is not a timm Swin checkpoint (no layers.S.blocks.J.{_TABLE}), "
                          f"but config.model is a Swin's (family 'swin'); first keys: "
                          f"{sorted(raw)[:8]}")
  return raw


def swin_file_config(path: str, cfg: ml_collections.ConfigDict,
                     pinned: Collection[str] = ()) -> ml_collections.ConfigDict:
  """The `cfg` that `load_swin_checkpoint(path, cfg, pinned)` returns, without building the
  model."""
  return _with_shape(cfg, infer_swin_shape(_read_timm_swin(path)), path, pinned)


def _checked(flat: Flat, cfg: ml_collections.ConfigDict, path: str):
  """Params from our flat names, checked against the model of `cfg` (`CheckpointMismatchError`
  naming `path`)."""
  dummy = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  expected = jax.eval_shape(build_swin(cfg).init, jax.random.PRNGKey(0), dummy)["params"]
  try:
    check_against(flat, flax.traverse_util.flatten_dict(expected, sep="/"))
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f"{path}: {e}") from e
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")


def load_swin_checkpoint(path: str, cfg: ml_collections.ConfigDict, pinned: Collection[str] = ()):
  """`(cfg, params)` from a timm Swin `.npz` / `.safetensors` (either layout).

  As `load_checkpoint` for the ViT: the file decides the shape (`SHAPE_FIELDS`), `cfg`'s values
  for them are replaced, except that a field named in `pinned` (the command line's) must agree
  (`CheckpointError` names both values); the image size, LayerNorm epsilon and GELU form come
  from `cfg`. Names and shapes are checked against the model (`CheckpointMismatchError` lists
  missing, unexpected and mis-shaped keys).
  """
  raw = _read_timm_swin(path)
  cfg = _with_shape(cfg, infer_swin_shape(raw), path, pinned)
  return cfg, _checked(swin_from_timm(raw), cfg, path)


def checked_swin_params(flat: Flat, cfg: ml_collections.ConfigDict, path: str):
  """`(cfg, params)` from a complete model in our flat names (a quantized export): the shape read
  from them, names and shapes checked like `load_swin_checkpoint`."""
  try:
    shape = infer_swin_shape(swin_to_timm(flat))
  except KeyError as e:
    raise CheckpointMismatchError(f"{path}: not a complete Swin model: no {e}") from e
  cfg = _with_shape(cfg, shape, path, pinned=())
  return cfg, _checked(flat, cfg, path)


def save_timm_swin(path: str, params, layout: str = NEW, image_size: Optional[int] = None) -> None:
  """Writes our Swin `params` as a timm state dict of `layout` (`swin_to_timm`), a `.safetensors`
  or `.npz` file by the extension of `path`, atomically."""
  if not path.endswith((".safetensors", ".npz")):
    raise ValueError(f"{path}: a Swin checkpoint is written as .safetensors or .npz")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  sd = swin_to_timm(jax.device_get(flat), layout, image_size)
  with atomic_path(path) as tmp:
    if path.endswith(".safetensors"):
      from safetensors.numpy import save_file
      save_file(sd, tmp)
    else:
      np.savez(tmp, **sd)
