"""05: train the DiT on text-to-image and text-to-video, steps interleaved 7:3, under the frozen encoder.

The paper trains Lumina-Image-2.0 (T2I) and Wan2.1 (T2V; image:video steps 7:3, batch 512:128) on the
encoder's fused layer features, the layer weights learned jointly at first and then frozen (04). Here one
DiT (common.DiT) learns both kinds from the built-in world on the same schedule scaled down.

    python 05_train_diffusion.py                                # built-in world, MiniLM, Norm-Avg, CPU
    python 05_train_diffusion.py --init-from runs/layer_weights # stage 2: continue 04's run, weights frozen
    python 05_train_diffusion.py --resume                       # continue runs/diffusion
    torchrun --nproc_per_node=8 05_train_diffusion.py --data t2x.jsonl --encoder runs/stage1/model
    torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 --nproc_per_node=8 \
        05_train_diffusion.py --data t2x.jsonl --encoder runs/stage1/model      # batch sizes are global
    python 05_train_diffusion.py --backbone wan --vae tiny-wan-vae --out runs/wan  # diffusers' Wan2.1, on latents

--backbone lumina2|wan trains diffusers' Lumina2Transformer2DModel / WanTransformer3DModel (--backbone-config
tiny, paper or a config.json; --init-transformer keeps pretrained weights but the text embedder); --vae trains
on cached latents. A checkpoint carries its run's settings, so --resume and --init-from need no flag re-typed
and refuse one that contradicts it. Data: a jsonl of {"media", "caption", "kind"}, decoded into memory once.
Writes OUT/checkpoints/step_N.pt (resume), OUT/model.safetensors (EMA weights + run config, for 06), OUT/tb.
"""
from pathlib import Path

import torch

import common
import plumbing
from plumbing import DataError, log


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    common.add_run_args(p, out="runs/diffusion", encoder="minilm", steps=3000)
    p.add_argument("--fusion", default="norm-avg",
                   help="last, penultimate, layer:K, norm-avg, or frozen (with --layer-weights)")
    p.add_argument("--layer-weights", default=None, help="with --fusion frozen: layer_weights.pt written by 04")
    p.add_argument("--init-from", default=None, help="04's output folder (or one of its checkpoints) to continue")
    p.set_defaults(weights_lr=None)  # a learned fusion's lr: set by 04, carried by its checkpoint
    return p


def starting_point(args, given, out):
    """The checkpoint this run continues (its own with --resume, 04's with --init-from) and its name."""
    if args.resume:
        path, state = common.own_checkpoint(out, "05")
        if state is not None:
            return state, str(path)
        log(f"--resume: no checkpoint under {out}/checkpoints, starting fresh")
    if args.init_from:
        src = Path(args.init_from)
        path, state = (src, plumbing.load_checkpoint(src, common.CKPT_KIND)) if src.is_file() else \
            plumbing.load_latest_checkpoint(src, common.CKPT_KIND)
        if state is None:
            raise DataError(f"--init-from {src}: no checkpoints/step_*.pt (run 04_train_layer_weights.py first)")
        return state, str(path)
    return None, None


def make_fusion(args, state):
    """The text condition: a fixed fusion, 04's frozen weights, or (continuing 04) its learned fusion."""
    def build(encoder):
        if state is not None:
            return common.LayerFusion(state["fusion_mode"], encoder.num_layers,
                                      weights=state["fusion"].get("weights"))
        if args.fusion == "learned":
            raise DataError("--fusion learned: the layer weights are learned with the DiT by 04_train_layer_weights.py")
        weights = None
        if args.fusion == "frozen":
            if not args.layer_weights:
                raise DataError("--fusion frozen needs --layer-weights FILE (written by 04_train_layer_weights.py)")
            weights = common.load_layer_weights(args.layer_weights, encoder.name, encoder.num_layers)
        return common.LayerFusion(args.fusion, encoder.num_layers, weights=weights)
    return build


#################################################################################
#                                 Training loop                                 #
#################################################################################

def train_step(run):
    """One optimiser step on the next batch: rectified-flow loss, backward, clip, AdamW, lr, EMA."""
    kind, x, (feats, mask), t, noise = run.next_batch()
    with plumbing.autocast(run.d.device, run.dtype):
        cond = (run.fusion(feats) if run.learned else feats, mask)  # continuing 04: its frozen weights
        loss = run.rf.loss(run.ddp, x, cond, t, noise).mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config["grad_clip"], foreach=True))
    run.opt.step()
    run.sched.step()
    run.ema.update(run.model)
    run.step += 1
    return kind, loss.item()


def train(run, args, out, d, replaces=()):
    """Steps, a log line every --log-every, a checkpoint every --ckpt-every and at the end."""
    meter = common.TrainLog(out, d, args.steps, run.step, "train")
    stop = min(args.steps, args.stop_at or args.steps)
    while run.step < stop:
        kind, loss = train_step(run)
        meter.add(kind, loss)
        if run.step % args.log_every == 0 or run.step == stop:
            meter.flush(run)
        if d.is_main and (run.step % args.ckpt_every == 0 or run.step == stop):
            run.save(out, args.keep, "05", replaces=replaces)
            plumbing.atomic_write_json(out / "args.json", vars(args))
            replaces = ()
    meter.close()


def main(argv=None):
    args, given = plumbing.parse_flags(get_parser(), argv)
    d = plumbing.setup(args)
    out = Path(args.out)
    replaces = common.claim_run_dir(out, args)
    state, source = starting_point(args, given, out)
    if state is not None:
        common.adopt_config(args, state["config"], given, source)
    elif args.fusion != "frozen" and args.layer_weights:
        raise DataError(f"--layer-weights is for --fusion frozen, not {args.fusion!r}")
    run = common.build_run(args, d, make_fusion(args, state), state, source)
    if run.learned and run.frozen_at is None:  # 04 --continuous: freeze where it stopped
        run.freeze_layer_weights()
    if run.step >= args.steps:
        log(f"{source} is at step {run.step} of --steps {args.steps}: nothing left to train")
    else:
        train(run, args, out, d, replaces)
        log(f"done: step {run.step}, {out / 'model.safetensors'}")
    plumbing.cleanup_distributed()


if __name__ == "__main__":
    plumbing.run_cli(main)
