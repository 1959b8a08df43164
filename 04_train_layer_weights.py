"""04: learn the softmax layer weights jointly with the DiT, then freeze them (stage 2, first part).

The text condition is sum_i softmax(w)_i * LayerNorm(h_i) over the encoder's decoder layers, w = 0 at the
start (exactly Norm-Avg), trained with the DiT in an optimiser group of its own. Weights that keep moving
make the condition non-stationary (Fig. 4, Table 5), so they freeze once no softmax weight moves more than
--freeze-tol over --freeze-window steps, or at --freeze-fraction of the planned --steps (the paper: 96k of
144k), whichever is first. 04 stops there with a checkpoint; 05 --init-from continues the same run:

    python 04_train_layer_weights.py                                   # stage-1 encoder of 03
    python 05_train_diffusion.py --init-from runs/layer_weights        # the rest of --steps, frozen
    python 04_train_layer_weights.py --continuous --out runs/ablation/continuous   # never freeze
    torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 --nproc_per_node=8 \
        04_train_layer_weights.py --encoder /ckpt/stage1 --data t2i.jsonl

The DiT flags are 05's, with the same defaults. --run-to-end trains on past the freeze in this process,
which is what 04 then 05 gives. Writes OUT/checkpoints/, OUT/model.safetensors, OUT/layer_weights.pt,
OUT/weights.png (weight per layer at several steps, like Fig. 4) and OUT/summary.json.
"""
import math
from pathlib import Path

import torch
import torch.distributed as dist

import common
import plumbing
from plumbing import DataError, log


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    pos = plumbing.positive_int
    common.add_run_args(p, out="runs/layer_weights", encoder="runs/stage1/model", steps=3000)
    p.add_argument("--weights-lr", type=plumbing.positive_float, default=1e-2, help="the layer weights' group")
    p.add_argument("--freeze-window", type=pos, default=200, help="steps over which convergence is judged")
    p.add_argument("--freeze-tol", type=plumbing.positive_float, default=2e-3,
                   help="largest change of any softmax weight over the window that counts as converged")
    p.add_argument("--freeze-fraction", type=plumbing.bounded(float, 1e-9, 1.0, what="a number in (0, 1]"),
                   default=2 / 3, help="freeze here at the latest (paper: 96k of 144k)")
    p.add_argument("--continuous", action="store_true", help="never freeze (Table 5's 'learned throughout')")
    p.add_argument("--run-to-end", action="store_true", help="after the freeze, train on to --steps here")
    p.set_defaults(fusion="learned")
    return p


#################################################################################
#                       Watching the weights, freezing them                     #
#################################################################################

class WeightWatch:
    """The freeze decision (criterion or planned step), snapshots for the plot, tensorboard scalars."""

    def __init__(self, args, extra=None):
        self.criterion = common.FreezeCriterion(args.freeze_window, args.freeze_tol)
        self.freeze_step = None if args.continuous else max(1, math.ceil(args.freeze_fraction * args.steps))
        self.plot_every = max(1, args.steps // 8)
        self.snapshots, self.reason = {}, None
        if extra:
            self.criterion.history = list(extra["history"])
            self.snapshots = {int(k): v for k, v in extra["snapshots"].items()}
            self.reason = extra["reason"]

    def after_step(self, run, writer):
        """True when the weights should freeze now. Every rank decides alike: the weights are identical."""
        w = run.fusion.layer_weights().detach().float().cpu()
        freeze = False
        if run.frozen_at is None and self.freeze_step is not None:
            converged = self.criterion.update(w)
            if converged or run.step >= self.freeze_step:
                self.reason = "converged" if converged else f"reached step {self.freeze_step}"
                freeze = True
        if run.step == 1 or run.step % self.plot_every == 0 or freeze:
            self.snapshots[run.step] = w
        if writer is not None:
            for i, v in enumerate(w.tolist()):
                writer.add_scalar(f"layer_weight/{i:02d}", v, run.step)
        return freeze

    def state_dict(self):
        return {"history": self.criterion.history, "snapshots": {str(k): v for k, v in self.snapshots.items()},
                "reason": self.reason}


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
    plumbing.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def write_results(run, watch, out):
    """The layer weights, their plot and a summary, written after the checkpoint they belong to."""
    name = run.config["encoder"]
    common.save_layer_weights(out / "layer_weights.pt", run.fusion, name, run.config["num_layers"])
    arm = f"frozen at step {run.frozen_at} ({watch.reason})" if run.frozen_at else f"continuous, step {run.step}"
    plot_weights(watch.snapshots, out / "weights.png", f"{name}: softmax layer weights, {arm}")
    plumbing.atomic_write_json(out / "summary.json", {
        "encoder": name, "num_layers": run.config["num_layers"], "frozen_at": run.frozen_at, "reason": watch.reason,
        "step": run.step, "planned_steps": run.config["steps"], "weights": run.fusion.layer_weights().tolist(),
        "snapshots": {str(k): v.tolist() for k, v in sorted(watch.snapshots.items())}})


#################################################################################
#                                     Main                                      #
#################################################################################

def train_step(run):
    """05's step, the layer weights' logits included until they freeze (their gradient averaged by hand: the
    fusion sits outside DDP so that it can freeze mid-run)."""
    kind, x, (feats, mask), t, noise = run.next_batch()
    with plumbing.autocast(run.d.device, run.dtype):
        loss = run.rf.loss(run.ddp, x, (run.fusion(feats), mask), t, noise).mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(run.model.parameters())
    if run.frozen_at is None:
        if run.d.enabled:
            dist.all_reduce(run.fusion.logits.grad)
            run.fusion.logits.grad /= run.d.world_size
        params.append(run.fusion.logits)
    run.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.config["grad_clip"], foreach=True))
    run.opt.step()
    run.sched.step()
    run.ema.update(run.model)
    run.step += 1
    return kind, loss.item()


def train(run, watch, args, out, d, replaces=()):
    """Joint steps until the freeze (then on to --steps with --run-to-end); checkpoints as 05's."""
    meter = common.TrainLog(out, d, args.steps, run.step, "joint")
    stop = min(args.steps, args.stop_at or args.steps)
    while run.step < stop:
        kind, loss = train_step(run)
        meter.add(kind, loss)
        freeze = watch.after_step(run, meter.writer)
        if freeze:
            run.freeze_layer_weights()
            log(f"layer weights frozen at step {run.step} ({watch.reason}): "
                f"{[round(v, 4) for v in run.fusion.layer_weights().tolist()]}")
        done = run.step == stop or (freeze and not args.run_to_end)
        if run.step % args.log_every == 0 or done:
            meter.flush(run)
        if d.is_main and (run.step % args.ckpt_every == 0 or done or freeze):
            run.save(out, args.keep, "04", extra=watch.state_dict(), replaces=replaces)
            plumbing.atomic_write_json(out / "args.json", vars(args))
            write_results(run, watch, out)
            replaces = ()
        if done:
            break
    meter.close()


def main(argv=None):
    args, given = plumbing.parse_flags(get_parser(), argv)
    d = plumbing.setup(args)
    out = Path(args.out)
    replaces = common.claim_run_dir(out, args)
    path, state = common.own_checkpoint(out, "04") if args.resume else (None, None)
    if state is not None:
        common.adopt_config(args, state["config"], given, str(path))
    if args.encoder == "runs/stage1/model" and not Path(args.encoder).is_dir():
        raise DataError("runs/stage1/model does not exist: run 03_finetune_qwen3vl.py first, or pass --encoder")
    run = common.build_run(args, d, lambda enc: common.LayerFusion("learned", enc.num_layers), state, str(path))
    watch = WeightWatch(args, state.get("extra") if state else None)
    if run.frozen_at is not None and not args.run_to_end or run.step >= args.steps:
        log(f"{path}: this stage is done (step {run.step}, weights frozen at {run.frozen_at})")
    else:
        train(run, watch, args, out, d, replaces)
    if run.frozen_at is not None and run.step < args.steps:
        log(f"continue with the weights frozen, to step {args.steps}:\n  python 05_train_diffusion.py --init-from {out}")
    plumbing.cleanup_distributed()


if __name__ == "__main__":
    plumbing.run_cli(main)
