"""Stage 2, step 1 of GRAN-TED: learn softmax layer weights jointly with the DiT, then freeze them.

The text condition is sum_i softmax(w)_i * LayerNorm(h_i) over the encoder's decoder layers, with w
(one scalar per layer, zeros at start, so training starts exactly at Norm-Avg) trained together
with the DiT in its own optimiser group. Weights that keep moving make the condition
non-stationary (the paper's Fig. 4: they never settle under continuous training, and Table 5: a
continuously learned fusion is worse than fixed Norm-Avg), so they are frozen once they converge:
when the softmax weights move less than `--freeze-tol` over `--freeze-window` steps, or at
`--freeze-fraction` of the planned steps (the paper: 96k of 144k T2I steps), whichever comes first.
At that point this script writes the weights and the DiT checkpoint and stops; 05 continues with
the weights frozen:

    python 04_train_layer_weights.py                 # stage-1 encoder of 03 (runs/stage1/model)
    python 05_train_diffusion.py --fusion frozen --layer-weights runs/layer_weights/layer_weights.pt \
        --init-from runs/layer_weights/dit.pt --hidden 128 --depth 6 --heads 4 --steps <remaining steps printed by 04>
    torchrun --nproc_per_node=8 04_train_layer_weights.py --encoder /ckpt/stage1 --data t2i.jsonl
    torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --nproc_per_node=8 04_train_layer_weights.py ...

`--continuous` never freezes (the "learned throughout" arm of the ablation in the README).
Every flag of 05 works here too; the defaults differ only where this stage needs them.
"""
import importlib
import math
from pathlib import Path

import torch

import common
from common import DataError, log

train_diffusion = importlib.import_module("05_train_diffusion")


#################################################################################
#                               Freeze criterion                                #
#################################################################################

class FreezeCriterion:
    """Converged when no softmax weight moved more than `tol` over the last `window` steps."""

    def __init__(self, window, tol):
        self.window, self.tol = window, tol
        self.history = []  # softmax weights, one entry per step, the last window+1 kept

    def update(self, weights):
        """Record this step's weights; True once the window shows convergence."""
        self.history = (self.history + [weights.detach().float().cpu()])[-(self.window + 1):]
        if len(self.history) <= self.window:
            return False
        # Every step of the window, not just its two ends: an oscillation can return to where it was.
        return (torch.stack(self.history) - self.history[-1]).abs().max().item() < self.tol

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, sd):
        self.history = list(sd["history"])


#################################################################################
#                        The hook that steers 05's loop                         #
#################################################################################

class LayerWeightHook(train_diffusion.FusionHook):
    """Logs each layer's weight, keeps snapshots for the plot, freezes on convergence or at the
    planned step, and writes the frozen weights."""

    def __init__(self, args, encoder_name, num_layers):
        self.lr = args.weights_lr
        self.criterion = FreezeCriterion(args.freeze_window, args.freeze_tol)
        self.freeze_step = None if args.continuous else max(1, math.ceil(args.freeze_fraction * args.steps))
        self.stop_on_freeze = not args.continuous  # 05 continues from here with the weights frozen
        self.out = Path(args.out)
        self.encoder_name, self.num_layers = encoder_name, num_layers
        self.plot_every = max(1, args.steps // 8)
        self.snapshots = {}  # step -> softmax weights, for the Fig. 4 style plot
        self.reason = None

    def should_freeze(self, step, fusion):
        if self.freeze_step is None:
            return False
        converged = self.criterion.update(fusion.layer_weights())
        if converged or step >= self.freeze_step:
            self.reason = "converged" if converged else f"reached step {self.freeze_step}"
            return True
        return False

    def after_step(self, step, fusion, writer):
        w = fusion.layer_weights().detach().float().cpu()
        if step == 1 or step % self.plot_every == 0:
            self.snapshots[step] = w
        if writer is not None:
            for i, v in enumerate(w.tolist()):
                writer.add_scalar(f"layer_weight/{i:02d}", v, step)

    def on_freeze(self, step, fusion):
        import encoders
        self.snapshots[step] = fusion.layer_weights().detach().float().cpu()
        if common.is_main_process():
            encoders.save_layer_weights(self.out / "layer_weights.pt", fusion, self.encoder_name, self.num_layers)
        log(f"layer weights frozen at step {step} ({self.reason}): {[round(v, 4) for v in fusion.layer_weights().tolist()]}")

    def state_dict(self):
        return {"criterion": self.criterion.state_dict(), "snapshots": self.snapshots, "reason": self.reason}

    def load_state_dict(self, sd):
        self.criterion.load_state_dict(sd["criterion"])
        self.snapshots, self.reason = dict(sd["snapshots"]), sd["reason"]


def plot_weights(snapshots, path, title):
    """Weight against layer index at several steps, like the paper's Fig. 4."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = sorted(snapshots)
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(steps):
        w = snapshots[s].numpy()
        ax.plot(range(1, len(w) + 1), w, marker="o", ms=3, color=cmap(i / max(1, len(steps) - 1)), label=f"step {s}")
    n = len(snapshots[steps[0]])
    ax.axhline(1 / n, color="grey", ls="--", lw=0.8, label="norm-avg (1/N)")
    ax.set_xticks(range(1, n + 1, max(1, n // 12)))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("softmax weight")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


#################################################################################
#                                     Main                                      #
#################################################################################

def get_parser():
    p = train_diffusion.get_parser()
    p.description = __doc__.split("\n")[0]
    # Pinned, not inherited from 05: the measured ablation in the README used these (and this DiT
    # shape, which 05 must be given again to --init-from 04's dit.pt).
    p.set_defaults(fusion="learned", out="runs/layer_weights", encoder="runs/stage1/model", steps=3000,
                   image_batch=32, video_batch=8, lr=5e-4, warmup=100, decay="constant",
                   hidden=128, depth=6, heads=4)
    p.add_argument("--weights-lr", type=float, default=1e-2, help="lr of the layer-weight group")
    p.add_argument("--freeze-window", type=int, default=200, help="steps over which convergence is judged")
    p.add_argument("--freeze-tol", type=float, default=2e-3, help="max change of any softmax weight over the window")
    p.add_argument("--freeze-fraction", type=float, default=2 / 3, help="freeze here at the latest (paper: 96k/144k)")
    p.add_argument("--continuous", action="store_true", help="never freeze (the ablation's 'learned throughout')")
    return p


def run(args, encoder=None):
    """Joint training until the freeze, then the weights, the DiT checkpoint, the plot, a summary."""
    if args.fusion != "learned":
        raise DataError("04 learns the layer weights: --fusion must be learned")
    import encoders
    d = common.init_distributed(args.device)
    if encoder is None:
        encoder_name = train_diffusion.resolve_encoder(args.encoder)
        if encoder_name == "runs/stage1/model" and not Path(encoder_name).is_dir():
            raise DataError("runs/stage1/model does not exist: run 03_finetune_qwen3vl.py first, or pass --encoder")
        encoder = encoders.load_encoder(encoder_name, device=d.device,
                                        dtype=common.pick_dtype(d.device, args.encoder_dtype))
    hook = LayerWeightHook(args, encoder.name, encoder.num_layers)
    res = train_diffusion.train(args, hook=hook, encoder=encoder)
    if not d.is_main:
        return res
    out = Path(args.out)
    if res["frozen_at"] is None:  # --continuous: the weights at the end are what this arm used
        encoders.save_layer_weights(out / "layer_weights.pt", res["fusion"], hook.encoder_name, hook.num_layers)
    common.atomic_write_bytes(out / "dit.pt", Path(res["checkpoint"]).read_bytes())  # a copy, not a re-serialisation
    arm = "continuous" if args.continuous else f"frozen at step {res['frozen_at']} ({hook.reason})"
    plot_weights(hook.snapshots, out / "weights.png", f"{hook.encoder_name}: softmax layer weights, {arm}")
    common.atomic_write_json(out / "summary.json", {
        "encoder": hook.encoder_name, "num_layers": hook.num_layers, "frozen_at": res["frozen_at"],
        "reason": hook.reason, "planned_steps": args.steps, "weights": res["fusion"].layer_weights().detach().tolist(),
        "snapshots": {str(k): v.tolist() for k, v in sorted(hook.snapshots.items())}})
    log(f"wrote {out / 'layer_weights.pt'}, {out / 'dit.pt'}, {out / 'weights.png'}")
    if res["frozen_at"] is not None:
        log("continue with the weights frozen:\n  python 05_train_diffusion.py --fusion frozen "
            f"--layer-weights {out / 'layer_weights.pt'} --init-from {out / 'dit.pt'} "
            f"--encoder {hook.encoder_name} --hidden {args.hidden} --depth {args.depth} --heads {args.heads} "
            f"--steps {args.steps - res['frozen_at']}")
    return res


def main(argv=None):
    run(get_parser().parse_args(argv))


if __name__ == "__main__":
    main()
