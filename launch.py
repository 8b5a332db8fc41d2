"""clamp_jax command line in a checkout; the same as the installed `clamp-jax` (clamp_jax/cli.py).

  python launch.py --config=configs/fmnist_vit.py[:args] --workdir=DIR [--mode=quantize|generate|eval|train]
                   [--config.a.b=value ...] [--verbosity=1] [--debug]
"""

from clamp_jax.cli import FLAGS, main, run  # noqa: F401  (FLAGS, main: for callers in-process)

if __name__ == "__main__":
  run()
