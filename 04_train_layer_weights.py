"""04: learn the softmax layer weights jointly with the DiT, then freeze them (stage 2, first part).

The text condition is sum_i softmax(w)_i * LayerNorm(h_i) over the encoder's decoder layers, w = 0 at the
start (exactly Norm-Avg), trained with the DiT in an optimiser group of its own. Weights that keep moving
make the condition non-stationary (Fig. 4, Table 5), so they freeze once no softmax weight moves more than
2e-3 over 200 steps (models.FreezeCriterion), or at --freeze of the planned --steps (the paper: 96k of 144k),
whichever is first. 04 stops there with a checkpoint; 05 --init-from continues the same run:

    python 04_train_layer_weights.py                                   # stage-1 encoder of 03
    python 05_train_diffusion.py --init-from runs/layer_weights        # the rest of --steps, frozen
    python 04_train_layer_weights.py --freeze never --out runs/ablation/continuous   # learned throughout
    torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 --nproc_per_node=8 \
        04_train_layer_weights.py --encoder /ckpt/stage1 --data t2i.jsonl

The DiT flags are 05's, with the same defaults. --run-to-end trains on past the freeze in this process,
which is what 04 then 05 gives. Writes OUT/checkpoints/, OUT/model.safetensors, OUT/layer_weights.pt,
OUT/weights.png (weight per layer at several steps, like Fig. 4) and OUT/summary.json.
"""
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

import common
import models
import plumbing
from plumbing import DataError, log


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    common.add_run_args(p, out="runs/layer_weights", encoder="runs/stage1/model", steps=3000)
    p.add_argument("--weights-lr", type=plumbing.positive_float, default=1e-2, help="the layer weights' group")
    p.add_argument("--freeze", type=freeze_at, default=2 / 3,
                   help="freeze at this fraction of --steps at the latest (paper: 96k of 144k), or never "
                        "(Table 5's 'learned throughout')")
    p.add_argument("--run-to-end", action="store_true", help="after the freeze, train on to --steps here")
    p.set_defaults(fusion="learned")  # what the run config records; 04's fusion is always learned
    return p


def freeze_at(text):
    """--freeze: a fraction in (0, 1], or 'never' (None)."""
    if text in ("never", None):
        return None
    return plumbing.bounded(float, 1e-9, 1.0, what="a number in (0, 1] or never")(text)


#################################################################################
#                       Watching the weights, freezing them                     #
#################################################################################

class WeightWatch:
    """The freeze decision (criterion or planned step), snapshots for the plot, tensorboard scalars."""

    def __init__(self, args, extra=None):
        self.criterion = models.FreezeCriterion()
        self.freeze_step = None if args.freeze is None else max(1, math.ceil(args.freeze * args.steps))
        self.plot_every = max(1, args.steps // 8)
        self.snapshots, self.reason = {}, None
        if extra:
            self.criterion.history = list(extra["history"])
            self.snapshots = {int(k): v for k, v in extra["snapshots"].items()}
            self.reason = extra["reason"]

    def after_step(self, step, fusion, frozen_at, writer):
        """True when the weights should freeze now. Every rank decides alike: the weights are identical."""
        w = fusion.layer_weights().detach().float().cpu()
        freeze = False
        if frozen_at is None and self.freeze_step is not None:
            converged = self.criterion.update(w)
            if converged or step >= self.freeze_step:
                self.reason = "converged" if converged else f"reached step {self.freeze_step}"
                freeze = True
        if step == 1 or step % self.plot_every == 0 or freeze:
            self.snapshots[step] = w
        if writer is not None:
            for i, v in enumerate(w.tolist()):
                writer.add_scalar(f"layer_weight/{i:02d}", v, step)
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


def write_results(config, fusion, frozen_at, step, watch, out):
    """The layer weights, their plot and a summary, written after the checkpoint they belong to."""
    name = config["encoder"]
    models.save_layer_weights(out / "layer_weights.pt", fusion, name, config["num_layers"])
    arm = f"frozen at step {frozen_at} ({watch.reason})" if frozen_at else f"continuous, step {step}"
    plot_weights(watch.snapshots, out / "weights.png", f"{name}: softmax layer weights, {arm}")
    plumbing.atomic_write_json(out / "summary.json", {
        "encoder": name, "num_layers": config["num_layers"], "frozen_at": frozen_at, "reason": watch.reason,
        "step": step, "planned_steps": config["steps"], "weights": fusion.layer_weights().tolist(),
        "snapshots": {str(k): v.tolist() for k, v in sorted(watch.snapshots.items())}})


#################################################################################
#                                    Training                                   #
#################################################################################

def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    path, state = common.own_checkpoint(args.out, "04") if args.resume else (None, None)
    if state is not None:
        args = common.checkpoint_args(parser, argv, state["config"], str(path))
    if args.encoder == "runs/stage1/model" and not Path(args.encoder).is_dir():
        raise DataError("runs/stage1/model does not exist: run 03_finetune_qwen3vl.py first, or pass --encoder")
    replaces = common.claim_run_dir(args.out, args)
    d = plumbing.setup(args)

    # Data: media in memory (or their VAE latents); every layer of each caption, normalised, cached once.
    data, encoder, fusion, bank, vae_id = common.t2x_data(
        args, d, lambda enc: models.LayerFusion("learned", enc.num_layers))
    config = common.run_config(args, encoder, data, vae_id, state and state["config"])

    # Model, EMA, optimiser: the DiT, and the layer-weight logits (w = 0: Norm-Avg) in a group of their own.
    model = common.new_model(config, bank, fusion, d.device, fresh=state is None)
    fusion.requires_grad_(True)
    opt, sched = common.optimiser(model, fusion, args, d, weights_lr=args.weights_lr)
    parts = {"model": model, "ema": models.EMA(model), "opt": opt, "sched": sched, "fusion": fusion}
    batches = common.streams(data, args, d)
    step, frozen_at = 0, None
    watch = WeightWatch(args, state.get("extra") if state else None)
    if state is not None:  # everything a resume needs, so the curve continues exactly
        common.check_same_run(state["config"], config, str(path))
        step, frozen_at = common.restore(state, str(path), parts, batches)
        if frozen_at is not None:
            fusion.logits.requires_grad_(False)
    if frozen_at is not None and not args.run_to_end or step >= args.steps:
        log(f"{path}: this stage is done (step {step}, weights frozen at {frozen_at})")
    train(args, config, d, data, bank, batches, parts, step, frozen_at, watch, replaces)
    plumbing.cleanup_distributed()


def train(args, config, d, data, bank, batches, parts, step, frozen_at, watch, replaces):
    """The loop: 05's step with the logits in it until they freeze; after each step the freeze rule."""
    model, ema, opt, sched, fusion = (parts[k] for k in ("model", "ema", "opt", "sched", "fusion"))
    # The fusion sits outside DDP so that it can freeze mid-run; its gradient is averaged by hand below.
    ddp, rf, out = plumbing.ddp(model, d), models.RectifiedFlow(), Path(args.out)
    stop, writer, losses, t0 = min(args.steps, args.stop_at or args.steps), None, {}, time.time()
    dtype = plumbing.pick_dtype(d.device, args.dtype)
    while step < stop and (frozen_at is None or args.run_to_end):
        kind, x, (feats, mask), t, noise = common.t2x_batch(data, bank, batches, step, args, d, rf)
        with plumbing.autocast(d.device, dtype):
            loss = rf.loss(ddp, x, (fusion(feats), mask), t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(model.parameters())
        if frozen_at is None:
            if d.enabled:
                dist.all_reduce(fusion.logits.grad)
                fusion.logits.grad /= d.world_size
            params.append(fusion.logits)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, common.GRAD_CLIP, foreach=True))
        opt.step()
        sched.step()
        ema.update(model)
        step += 1
        losses.setdefault(kind, []).append(loss.item())
        writer = writer or common.tensorboard(out, d)
        freeze = watch.after_step(step, fusion, frozen_at, writer)
        if freeze:  # for good: no gradient, so AdamW leaves the logits where they are
            frozen_at = step
            fusion.logits.requires_grad_(False)
            fusion.logits.grad = None
            log(f"layer weights frozen at step {step} ({watch.reason}): "
                f"{[round(v, 4) for v in fusion.layer_weights().tolist()]}")
        done = step == stop or (freeze and not args.run_to_end)
        if step % args.log_every == 0 or done:
            common.log_losses(writer, step, args.steps, losses, grad_norm, opt.param_groups[0]["lr"], time.time() - t0)
            losses, t0 = {}, time.time()
        if d.is_main and (step % args.ckpt_every == 0 or done or freeze):
            common.save_run(out, "04", args, config, step, frozen_at, parts, batches, replaces, extra=watch.state_dict())
            write_results(config, fusion, frozen_at, step, watch, out)
            replaces = ()
    if writer is not None:
        writer.close()
    if frozen_at is not None and step < args.steps:
        log(f"continue with the weights frozen, to step {args.steps}:\n  python 05_train_diffusion.py --init-from {out}")


if __name__ == "__main__":
    plumbing.run_cli(main)
