"""The same training from a script of your own: dist_train.fit with your objects.

    python examples/byo_train.py OUT                          a world of one
    mpirun -n 2 python examples/byo_train.py OUT              MPI
    torchrun --nproc-per-node 2 examples/byo_train.py OUT     torch.distributed
    srun -n 2 python examples/byo_train.py OUT                SLURM
"""

import sys
from pathlib import Path

import dist_train

sys.path.insert(0, str(Path(__file__).parent))
import byo  # noqa: E402


def main(out: str, *sets: str) -> None:
    cfg = dist_train.config.load(Path(__file__).with_name("byo.yaml"), list(sets))
    result = dist_train.fit(cfg, model=byo.small_cnn, data=byo.CroppedDigits(pad=1), loss=byo.smooth_cross_entropy,
                            out_dir=out)
    print(f"eval accuracy {result.summary['eval']['accuracy']:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
