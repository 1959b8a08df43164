"""05: train the DiT on text-to-image and text-to-video, steps interleaved 7:3, under the frozen encoder.

The paper trains Lumina-Image-2.0 (T2I) and Wan2.1 (T2V; image:video steps 7:3, batch 512:128) on the
encoder's fused layer features, the layer weights learned jointly at first and then frozen (04). Here one
DiT (models.DiT) learns both kinds from the built-in world on the same schedule scaled down.

    python 05_train_diffusion.py                                # built-in world, MiniLM, Norm-Avg, CPU
    python 05_train_diffusion.py --init-from runs/layer_weights # stage 2: continue 04's run, weights frozen
    python 05_train_diffusion.py --resume                       # continue runs/diffusion
    torchrun --nproc_per_node=8 05_train_diffusion.py --data t2x.jsonl --encoder runs/stage1/model
    torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 --nproc_per_node=8 \
        05_train_diffusion.py --data t2x.jsonl --encoder runs/stage1/model      # batch sizes are global
    python 05_train_diffusion.py --backbone wan --vae tiny-wan-vae --out runs/wan  # diffusers' Wan2.1, on latents

--backbone lumina2|wan trains diffusers' Lumina2Transformer2DModel / WanTransformer3DModel (--backbone-config
tiny, paper, a config.json, or a diffusers folder or hub id whose weights it starts from, all but the text
embedder); --vae trains on cached latents. A checkpoint carries its run's settings, so --resume and
--init-from need no flag re-typed and refuse one that contradicts it. Data: a jsonl of {"media", "caption", "kind"}, decoded into memory once.
Writes OUT/checkpoints/step_N.pt (resume), OUT/model.safetensors (EMA weights + run config, for 06), OUT/tb.
"""
import time
from pathlib import Path

import torch

import common
import models
import plumbing
from plumbing import DataError, log


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    common.add_run_args(p, out="runs/diffusion", encoder="minilm", steps=3000)
    p.add_argument("--fusion", default="norm-avg",
                   help="last, penultimate, layer:K, norm-avg, or frozen (with --layer-weights)")
    p.add_argument("--layer-weights", default=None, help="with --fusion frozen: layer_weights.pt written by 04")
    p.add_argument("--init-from", default=None, help="04's output folder (or one of its checkpoints) to continue")
    return p


def starting_point(parser, argv):
    """(flags, the checkpoint this run continues or None, its name): --resume continues our own run,
    --init-from 04's; either way the checkpoint's flags are the defaults."""
    args = parser.parse_args(argv)
    path, state = common.own_checkpoint(args.out, "05") if args.resume else (None, None)
    if args.resume and state is None:
        log(f"--resume: no checkpoint under {args.out}/checkpoints, starting fresh")
    if state is None and args.init_from:
        src = Path(args.init_from)
        path, state = (src, plumbing.load_checkpoint(src, models.CKPT_KIND)) if src.is_file() else \
            plumbing.load_latest_checkpoint(src, models.CKPT_KIND)
        if state is None:
            raise DataError(f"--init-from {src}: no checkpoints/step_*.pt (run 04_train_layer_weights.py first)")
    if state is None:
        if args.fusion != "frozen" and args.layer_weights:
            raise DataError(f"--layer-weights is for --fusion frozen, not {args.fusion!r}")
        return args, None, None
    return common.checkpoint_args(parser, argv, state["config"], str(path)), state, str(path)


def make_fusion(args, state):
    """The text condition: a fixed fusion, 04's frozen weights, or (continuing 04) its learned fusion."""
    def build(encoder):
        if state is not None:
            return models.LayerFusion(state["fusion_mode"], encoder.num_layers,
                                      weights=state["fusion"].get("weights"))
        if args.fusion == "learned":
            raise DataError("--fusion learned: the layer weights are learned with the DiT by 04_train_layer_weights.py")
        weights = None
        if args.fusion == "frozen":
            if not args.layer_weights:
                raise DataError("--fusion frozen needs --layer-weights FILE (written by 04_train_layer_weights.py)")
            weights = models.load_layer_weights(args.layer_weights, encoder.name, encoder.num_layers)
        return models.LayerFusion(args.fusion, encoder.num_layers, weights=weights)
    return build


#################################################################################
#                                    Training                                   #
#################################################################################

def main(argv=None):
    parser = get_parser()
    args, state, source = starting_point(parser, argv)
    out = Path(args.out)
    replaces = common.claim_run_dir(out, args)
    d = plumbing.setup(args)

    # Data: media in memory (or their VAE latents), each caption's features encoded once and cached.
    data, encoder, fusion, bank, vae_id = common.t2x_data(args, d, make_fusion(args, state))
    config = common.run_config(args, encoder, data, vae_id, state and state["config"])

    # Model, EMA, optimiser. Continuing 04, its layer-weight logits keep their optimiser group, frozen.
    model = common.new_model(config, bank, fusion, d.device, fresh=state is None)
    ema = models.EMA(model)
    learned = fusion.requires_grad_(False).mode == "learned"
    opt, sched = common.optimiser(model, fusion, args, d)  # continuing 04: its logits' group, lr from its state
    batches = common.streams(data, args, d)
    ddp = plumbing.ddp(model, d)
    rf = models.RectifiedFlow()
    parts = {"model": model, "ema": ema, "opt": opt, "sched": sched, "fusion": fusion}
    step, frozen_at = 0, None
    if state is not None:  # everything a resume needs, so the curve continues exactly
        common.check_same_run(state["config"], config, source)
        step, frozen_at = common.restore(state, source, parts, batches)
        if learned and frozen_at is None:  # 04 --freeze never: its weights freeze here
            frozen_at = step
    if step >= args.steps:
        log(f"{source} is at step {step} of --steps {args.steps}: nothing left to train")

    # The loop: forward, backward, clip, AdamW, lr, EMA; a log line and tensorboard every --log-every
    # steps, a checkpoint (resume) and model.safetensors (06) every --ckpt-every and at the end.
    stop, writer, losses, t0 = min(args.steps, args.stop_at or args.steps), None, {}, time.time()
    dtype = plumbing.pick_dtype(d.device, args.dtype)
    while step < stop:
        kind, x, (feats, mask), t, noise = common.t2x_batch(data, bank, batches, step, args, d, rf)
        with plumbing.autocast(d.device, dtype):
            cond = (fusion(feats) if learned else feats, mask)  # continuing 04: its frozen weights
            loss = rf.loss(ddp, x, cond, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), common.GRAD_CLIP, foreach=True))
        opt.step()
        sched.step()
        ema.update(model)
        step += 1
        losses.setdefault(kind, []).append(loss.item())
        writer = writer or common.tensorboard(out, d)
        if step % args.log_every == 0 or step == stop:
            common.log_losses(writer, step, args.steps, losses, grad_norm, opt.param_groups[0]["lr"], time.time() - t0)
            losses, t0 = {}, time.time()
        if d.is_main and (step % args.ckpt_every == 0 or step == stop):
            common.save_run(out, "05", args, config, step, frozen_at, parts, batches, replaces)
            replaces = ()
    if writer is not None:
        writer.close()
    if step == stop:
        log(f"done: step {step}, {out / 'model.safetensors'}")
    plumbing.cleanup_distributed()


if __name__ == "__main__":
    plumbing.run_cli(main)
