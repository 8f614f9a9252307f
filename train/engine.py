"""The training loop: AdamW with a separate backbone learning rate, gradient clipping,
linear warm-up and a StepLR-style drop, an optional moving average of the weights,
optional AMP on CUDA, tqdm progress, CSV and
TensorBoard metrics, periodic COCO evaluation, best/last checkpoints written atomically,
exact resume (model, optimizer, schedule, epoch, step inside the epoch, RNG), and DDP
under torchrun (NCCL on GPUs, gloo on CPUs)."""
from __future__ import annotations

import copy
import csv
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from detr_edge.runtime.coco import find_split
from detr_edge.runtime.errors import UserError

from .backbone import downsample_mask, training_memory_format
from .checkpoint import load_model, read_checkpoint, save_checkpoint
from .config import DETRConfig, checkpoint_config, preset
from .criterion import SetCriterion
from .data import CocoDetection, Transform, collate
from .dense_head import BACKBONE_HEAD_LEVELS, DenseHead
from .denoising import Denoising
from .detr import DETR, ExtraQueries
from .evaluate import evaluate
from .matcher import HungarianMatcher
from .query_init import anchor_model, anchor_training_parts
from .transformer import QueryBlocks

log = logging.getLogger("detr_edge")
PACE_SHARE = 0.05  # the share of --time-limit after which the run foretells where the limit stops it


@dataclass
class TrainOptions:
    data: str
    out: str = "runs/train"
    preset: str = "detr_r50"
    weights: str | None = None       # official / HF / ours: fine-tune (class head re-initialised if needed)
    resume: str | None = None        # a last.pth of ours: continue exactly
    imgsz: tuple | None = None       # default: the preset's (or the weights')
    recipe: str = "edge"             # edge: letterbox at imgsz; official: multi-scale 480..800
    zoom: float = 0.5                # edge recipe: probability of the random zoom-in crop
    epochs: int = 300
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int = 200               # epochs before the x0.1 drop
    warmup: int = 0                  # linear warm-up steps
    eos_coef: float = 0.1
    class_weight: float = 1.0        # the class term's weight in the loss and in the matching cost
    aux_loss: bool = True
    groups: int = 1                  # Group DETR query groups (training only; the model stays plain DETR)
    denoise: int = 0                 # contrastive denoising queries per image (DINO's 100; training only); 0 = none
    encoder_head: float = 0.0        # weight of the one-to-many dense heads' loss (training only); 0 = none
    backbone_head: tuple = ()        # backbone levels (layer2, layer3) that get a dense head too
    query_init: str = "random"       # random: the official; anchors: train/query_init.py (from scratch only)
    contiguous: bool = False         # remap category ids to 0..C-1
    eval_every: int = 1              # epochs; 0 = only at the end
    save_every: int = 200            # steps between last.pth writes inside an epoch
    time_limit: float = 0.0          # minutes; 0 = none
    max_steps: int = 0               # steps in all; 0 = none (the epochs bound the run)
    drop_at: float = 0.0             # share of the run (max_steps or time_limit, whichever ends first)
                                     # after which lr drops x0.1 (wsd: decays to 0); 0 = only the epoch drop
    schedule: str = "step"           # step: x0.1 drops (the official); linear / cosine: to 0 over the run;
                                     # wsd: held, then from drop_at to 0 at the end (1 - sqrt)
    ema: float = 0.0                 # decay of the weights' moving average (evaluated and saved); 0 = none
    workers: int = 1
    device: str = "cpu"
    amp: bool = False
    seed: int = 42


# what defines a run: `--resume` takes these from the checkpoint (given again, they must
# agree); where the data is, how long, how often to evaluate or save, on what device, may change
RUN_DEFINING = ("preset", "weights", "imgsz", "recipe", "zoom", "batch_size", "lr", "lr_backbone", "weight_decay",
                "clip_max_norm", "lr_drop", "warmup", "schedule", "eos_coef", "class_weight", "aux_loss", "groups",
                "denoise", "encoder_head", "backbone_head", "query_init", "contiguous", "ema", "seed")
# the run's bounds, counted over the whole run: `--resume` keeps them unless given again
# (--time-limit is not among them: it counts the minutes of the process it is given to)
RUN_BOUNDS = ("epochs", "max_steps", "drop_at")


def resume_options(given: dict) -> TrainOptions:
    """The options of the run `given['resume']` continues (and its folder), with what `given`
    may change; an option given again with another value is refused in one line, naming it."""
    saved = read_checkpoint(given["resume"])[2].get("options") or {}
    restored = {}
    for name in RUN_DEFINING:
        if name not in saved:
            continue
        value = tuple(saved[name]) if isinstance(saved[name], list) else saved[name]
        if name in given and given[name] != value:
            raise UserError(f"--{name.replace('_', '-')} {given[name]} contradicts the run {given['resume']} continues "
                            f"({value}): leave it out to keep the run's")
        restored[name] = value
    restored.update({name: saved[name] for name in RUN_BOUNDS if name in saved})
    if not (given.get("max_steps", restored.get("max_steps")) or given.get("time_limit")):
        restored.pop("drop_at", None)  # a share of a time limit not given again (the step drop is in the schedule's state)
    restored["out"] = str(Path(given["resume"]).parent)  # the run goes on in its own folder unless --out moves it
    return TrainOptions(**{**restored, **given})


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded over ranks, starting at a given batch:
    what lets a run resume in the middle of an epoch on the very same order."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0
        self.batches = (size // world) // batch_size
        if self.batches == 0:
            raise UserError(f"{size} images are fewer than one batch of {batch_size} per process")

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank::self.world][: self.batches * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self):
        return (self.batches - self.start_batch) * self.batch_size


class TrainingModel(torch.nn.Module):
    """The model plus its training-only parts, which speed up convergence and are dropped
    after training, so checkpoints and exports are plain DETR (the parts are kept beside
    the weights under 'training_parts' only to resume):
    - Group DETR (Chen et al. 2023): G-1 extra groups of learned queries decoded beside the
      model's own, blind to each other, each matched one-to-one;
    - denoising queries (train/denoising.py): noised ground truth decoded beside them,
      unseen by the matching queries, reconstructing the true boxes and classes;
    - dense heads (train/dense_head.py): one-to-many supervision of the encoder's cells
      and, optionally, of backbone levels (read by forward hooks, so DETR stays untouched).

    The backbone trains mostly in channels-last memory order (train/backbone.py's
    training_memory_format): faster steps on CPUs, the same values."""

    def __init__(self, model: DETR, groups: int = 1, encoder_head: bool = False, backbone_head=(), denoise: int = 0):
        super().__init__()
        self.model, self.groups = model, groups
        training_memory_format(model.backbone)
        extra = (groups - 1) * model.config.num_queries
        self.group_queries = torch.nn.Parameter(torch.randn(extra, model.config.hidden_dim)) if extra else None
        d, classes = model.config.hidden_dim, model.config.num_classes
        self.denoising = Denoising(d, classes, denoise) if denoise else None
        self.encoder_head = DenseHead(d, classes) if encoder_head else None
        body, self._levels = model.backbone[0].body, {}
        self.backbone_heads = torch.nn.ModuleDict()
        for level in backbone_head:
            layer = getattr(body, level)
            channels = [m for m in layer.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels
            self.backbone_heads[level] = DenseHead(d, classes, in_channels=channels)
            layer.register_forward_hook(lambda _module, _inputs, output, level=level:
                                        self._levels.__setitem__(level, output))

    def forward(self, images, mask, targets=None):
        """`targets` feed the denoising queries (their outputs come last, `out['denoising']` says how)."""
        denoising = self.denoising(targets) if self.denoising is not None and targets is not None else None
        out = self.model(images.contiguous(memory_format=torch.channels_last), mask,
                         self._extra(images.shape[0], denoising))
        if denoising is not None:
            out["denoising"] = denoising
        dense = {}
        if self.encoder_head is not None:
            dense["enc"] = self.encoder_head(out["memory"], out["memory_mask"])
        for level, head in self.backbone_heads.items():
            features = self._levels.pop(level)
            dense[level] = head(features, downsample_mask(mask, features.shape[-2:]))
        if dense:
            out["dense_outputs"] = dense
        return out

    def _extra(self, batch: int, denoising) -> ExtraQueries | None:
        """The query groups' and the denoising queries' inputs, in that order, and who sees whom."""
        if self.groups == 1 and denoising is None:
            return None
        blocks = QueryBlocks(self.model.config.num_queries, self.groups,
                             *((denoising.groups, 2 * denoising.pad) if denoising is not None else ()))
        pos, content = [], []
        if self.group_queries is not None:  # learned queries: their decoder targets start at zero
            pos.append(self.group_queries[:, None].expand(-1, batch, -1))
            content.append(torch.zeros_like(pos[-1]))
        if denoising is not None:
            pos.append(denoising.pos)
            content.append(denoising.content)
        return ExtraQueries(torch.cat(pos), torch.cat(content), blocks)

    def training_parts(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}  # detached

    def load_training_parts(self, parts: dict, source) -> None:
        mine = self.training_parts()
        if {k: v.shape for k, v in parts.items()} != {k: v.shape for k, v in mine.items()}:
            raise UserError(f"{source}: its run trained other training-only parts ({', '.join(parts) or 'none'}); "
                            "resume with the same --groups, --denoise, --encoder-head and --backbone-head")
        self.load_state_dict(parts, strict=False)


def _distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _param_groups(trainer: TrainingModel, opts: TrainOptions):
    """Backbone at lr_backbone (a pretrained, frozen-BN backbone trains layer2..4 only, as
    the official code); the rest at lr."""
    backbone, rest = [], []
    for name, param in trainer.named_parameters():
        if name.startswith("model.backbone."):
            pretrained_stem = trainer.model.config.frozen_bn and not any(f"layer{i}" in name for i in (2, 3, 4))
            if opts.lr_backbone <= 0 or pretrained_stem:
                param.requires_grad_(False)
                continue
            backbone.append(param)
        else:
            rest.append(param)
    return [{"params": rest, "lr": opts.lr}, {"params": backbone, "lr": opts.lr_backbone}]


def trainer_for(model: DETR, opts: TrainOptions) -> TrainingModel:
    """The model with the options' training-only parts (groups, dense heads, denoising)."""
    trainer = TrainingModel(model, opts.groups, opts.encoder_head > 0, opts.backbone_head, opts.denoise)
    if opts.query_init == "anchors":  # a resumed run's saved parts replace these starting values
        anchor_training_parts(trainer.group_queries, trainer.denoising.box_embed if trainer.denoising else None,
                              model.config.nheads)
    return trainer


def criterion_for(opts: TrainOptions, num_classes: int) -> SetCriterion:
    return SetCriterion(num_classes, HungarianMatcher(cost_class=opts.class_weight), eos_coef=opts.eos_coef,
                        loss_ce=opts.class_weight, aux_loss=opts.aux_loss, groups=opts.groups,
                        dense_weight=opts.encoder_head)


def optimizer_for(trainer: TrainingModel, opts: TrainOptions) -> torch.optim.AdamW:
    """AdamW over `_param_groups`, fused: one kernel for all parameters, where torch's
    default on CPUs loops over them in Python (10% of a CPU training step, profiled)."""
    return torch.optim.AdamW(_param_groups(trainer, opts), lr=opts.lr, weight_decay=opts.weight_decay, fused=True)


def clip_gradients(trainer: TrainingModel, optimizer: torch.optim.AdamW, max_norm: float) -> None:
    """clip_grad_norm_'s clipping (the official 0.1), applied by the fused AdamW as it reads
    the gradients: `optimizer.grad_scale`, the divisor GradScaler hands fused optimizers
    to unscale with, set to 1 / clip_grad_norm_'s factor. The same update to float rounding
    (the gradients left clipped, as before), without clip_grad_norm_'s separate pass over
    every gradient (2% of a CPU step, most of it layer4's weights); with AMP, GradScaler has
    unscaled the gradients before and keeps this divisor. Needs optimizer_for's fused AdamW
    (torch's other implementations refuse a grad_scale). 0 does not clip."""
    if max_norm <= 0:
        optimizer.grad_scale = None
        return
    total = torch.nn.utils.get_total_norm([p.grad for p in trainer.parameters() if p.grad is not None], foreach=True)
    optimizer.grad_scale = ((total + 1e-6) / max_norm).clamp(min=1.0)


def train_step(net, trainer: TrainingModel, criterion, optimizer: torch.optim.AdamW, scaler: torch.amp.GradScaler,
               max_norm: float, images, mask, targets) -> dict:
    """One update, as the loop takes it: forward and set loss (under autocast where `scaler`
    is enabled, i.e. AMP), backward, clipping inside the fused AdamW, the step. `net` is
    `trainer` or a wrapper of it (DDP, torch.compile). The losses stay on the device: the
    matcher's cost transfer is the step's one host synchronisation."""
    with torch.autocast(images.device.type, enabled=scaler.is_enabled()):
        losses = criterion(net(images, mask, targets), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    clip_gradients(trainer, optimizer, max_norm)
    scaler.step(optimizer)
    scaler.update()
    return losses


class LrSchedule:
    """The learning-rate factor per step: linear warm-up, then either x0.1 from the epoch
    drop (`--lr-drop`), from `--drop-at` of `--max-steps`, or from the step at which
    `--drop-at` of `--time-limit` had passed, whichever comes first (`step`: a bounded run
    ends in its fine phase whether its steps or its time run out first, so a slow machine
    drops by time and a fast one by steps); or a decay to 0 over the run (`linear`, `cosine`:
    budgeted training's schedules); or the peak rate until `--drop-at` of the run, then a
    decay to 0 at its end as 1 - sqrt(share of the decay spent) (`wsd`: warm-up, stable,
    decay; the "1-sqrt" cool-down of Hägele et al., "Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations", 2024). The decays follow the share of the
    run spent, in steps or in time, whichever is further. A callable object, so the
    scheduler's state saves the time drop's step and the share spent, and a resumed run
    keeps them; the step drops, the decay's start and the run's length follow the current
    options."""

    def __init__(self, warmup: int, drop_step: float, kind: str = "step", run_steps: float = math.inf,
                 decay_from: float = 0.0):
        self.warmup, self.drop_step, self.time_drop_step = warmup, drop_step, math.inf
        self.kind, self.run_steps, self.spent = kind, run_steps, 0.0  # spent: the largest share of the time seen
        self.decay_from = decay_from  # wsd: the share of the run where the decay starts

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "step":
            return warm * (0.1 if step >= min(self.drop_step, self.time_drop_step) else 1.0)
        share = min(1.0, max(self.spent, step / self.run_steps))
        if self.kind == "wsd":
            return warm * (1.0 - math.sqrt(max(0.0, share - self.decay_from) / (1.0 - self.decay_from)))
        left = 1.0 - share
        return warm * (left if self.kind == "linear" else 0.5 * (1 - math.cos(math.pi * left)))


class WeightAverage:
    """An exponential moving average of the weights and BatchNorm statistics, as ultralytics'
    and RT-DETR's ModelEMA: what is evaluated, saved and deployed, while training goes on
    with the raw weights. The first update copies; then the decay ramps up as
    decay * (1 - exp(-updates * (1 - decay))), so the average forgets the random start
    within its own horizon of 1 / (1 - decay) steps. (torch's AveragedModel computes the
    same, but reads its update count from the device every step: a synchronisation.)"""

    def __init__(self, model: DETR, decay: float):
        self.module, self.decay, self.updates = copy.deepcopy(model), decay, 0
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: DETR) -> None:
        averaged, current = list(self.module.state_dict().values()), list(model.state_dict().values())
        floats = [i for i, a in enumerate(averaged) if a.is_floating_point()]
        d = self.decay * (1 - math.exp(-self.updates * (1 - self.decay)))  # 0 at the first update: a copy
        torch._foreach_lerp_([averaged[i] for i in floats], [current[i] for i in floats], 1 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # BatchNorm's step counters
                a.copy_(c)
        self.updates += 1


def build(opts: TrainOptions):
    """Datasets, model, config and the checkpoint to resume from (if any)."""
    if not opts.class_weight > 0:
        raise UserError(f"class weight {opts.class_weight}: must be > 0")
    if not opts.encoder_head >= 0:
        raise UserError(f"encoder head weight {opts.encoder_head}: must be >= 0")
    if opts.drop_at and not (0 < opts.drop_at < 1 and (opts.time_limit or opts.max_steps)):
        raise UserError(f"--drop-at {opts.drop_at}: needs --time-limit or --max-steps and a share between 0 and 1")
    if opts.schedule in ("linear", "cosine") and opts.drop_at:
        raise UserError(f"--drop-at belongs to the step and wsd schedules; --schedule {opts.schedule} decays over "
                        "the whole run")
    if opts.schedule == "wsd" and not opts.drop_at:
        raise UserError("--schedule wsd needs --drop-at: the share of the run where the decay starts (e.g. 0.7)")
    if opts.max_steps < 0:
        raise UserError(f"--max-steps {opts.max_steps}: must be >= 0")
    if not 0 <= opts.ema < 1:
        raise UserError(f"--ema {opts.ema}: the decay must be between 0 and 1")
    unknown = set(opts.backbone_head) - set(BACKBONE_HEAD_LEVELS)
    if unknown:
        raise UserError(f"--backbone-head {','.join(sorted(unknown))}: choose from {', '.join(BACKBONE_HEAD_LEVELS)}")
    if opts.backbone_head and not opts.encoder_head:
        raise UserError("--backbone-head needs --encoder-head (whose W weights every dense head)")
    if opts.query_init not in ("random", "anchors"):
        raise UserError(f"--query-init {opts.query_init}: choose random or anchors")
    if opts.query_init == "anchors" and opts.weights:
        raise UserError("--query-init anchors starts a model from scratch; --weights brings trained queries")
    train_images, train_ann = find_split(opts.data, "train")
    val_images, val_ann = find_split(opts.data, "val")
    resumed = read_checkpoint(opts.resume)[2] if opts.resume else None
    if resumed is not None and "step_in_epoch" not in resumed:
        raise UserError(f"{opts.resume}: holds no detr-edge training state to resume; start from it with --weights")
    if resumed is not None and bool(opts.ema) != ("raw_model" in resumed):
        raise UserError(f"{opts.resume}: its run {'kept a' if 'raw_model' in resumed else 'kept no'} moving average "
                        "of the weights; resume with the same --ema")
    probe = CocoDetection(train_images, train_ann, contiguous=opts.contiguous)
    if opts.resume:
        model, config = load_model(opts.resume)
    elif opts.weights:
        model, config = load_model(opts.weights, num_classes=probe.num_classes, classes=probe.classes)
        if opts.imgsz:
            config = checkpoint_config(model.config, opts.imgsz, config["classes"])
    else:
        model_config, imgsz = preset(opts.preset)
        model_config = DETRConfig.from_dict({**model_config.to_dict(), "num_classes": probe.num_classes})
        model = DETR(model_config)
        if opts.query_init == "anchors":
            anchor_model(model)
        config = checkpoint_config(model_config, opts.imgsz or imgsz, probe.classes)
    if config["model"]["num_classes"] != probe.num_classes:
        raise UserError(f"{opts.resume}: the model has {config['model']['num_classes']} classes, "
                        f"the data {probe.num_classes}")
    imgsz = tuple(config["preprocess"]["imgsz"])
    probe.transform = Transform(opts.recipe, imgsz, train=True, zoom=opts.zoom)
    val = {"": CocoDetection(val_images, val_ann, Transform("edge", imgsz, train=False), contiguous=opts.contiguous)}
    try:  # the deployment's frame shapes, when the data has them (`data synth`'s cameras split)
        val["cameras_"] = CocoDetection(*find_split(opts.data, "cameras"), Transform("edge", imgsz, train=False),
                                        contiguous=opts.contiguous)
    except UserError:
        pass
    return probe, val, model, config, resumed


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))


def train(opts: TrainOptions) -> dict:
    rank, world = _distributed()
    torch.manual_seed(opts.seed + rank)
    random.seed(opts.seed + rank)
    out = Path(opts.out)
    train_set, val_sets, model, config, resumed = build(opts)
    device = torch.device(opts.device)
    model.to(device).train()
    criterion = criterion_for(opts, model.config.num_classes).to(device)
    # the average copies the model before the trainer hooks its backbone levels; of a resumed run: its saved average
    ema = WeightAverage(model, opts.ema) if opts.ema else None
    trainer = trainer_for(model, opts).to(device)
    deployed = ema.module if ema else model
    optimizer = optimizer_for(trainer, opts)
    sampler = EpochSampler(len(train_set), opts.batch_size, opts.seed, rank, world)
    run_steps = min(opts.max_steps or math.inf, opts.epochs * sampler.batches)
    schedule = LrSchedule(opts.warmup, _drop_step(opts, sampler.batches), opts.schedule, run_steps, opts.drop_at)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda", enabled=opts.amp and device.type == "cuda")
    epoch, step_in_epoch, global_step, best_ap = 0, 0, 0, -1.0
    if resumed:
        trainer.load_training_parts(resumed.get("training_parts", {}), opts.resume)
        if ema:
            model.load_state_dict(resumed["raw_model"])
            ema.updates = resumed["ema_updates"]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["lr_scheduler"])
        schedule.warmup, schedule.drop_step = opts.warmup, _drop_step(opts, sampler.batches)
        schedule.run_steps, schedule.decay_from = run_steps, opts.drop_at
        _match_parameter_layouts(optimizer)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # the next step's rate, as they say
            group["lr"] = base * schedule(scheduler.last_epoch)
        epoch, step_in_epoch = resumed["epoch"], resumed["step_in_epoch"]
        global_step, best_ap = resumed["global_step"], resumed.get("best_ap", -1.0)
        _set_rng_state(resumed["rng"])
        log.info("resumed %s at epoch %d, step %d of %d", opts.resume, epoch, step_in_epoch, sampler.batches)
    net = DistributedDataParallel(trainer) if world > 1 else trainer
    loader = torch.utils.data.DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=opts.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, drop_last=True)
    main_process = rank == 0
    writer = _tensorboard(out) if main_process else None
    csv_path = out / "metrics.csv"
    start = time.monotonic()
    metrics = {}
    logged = LossLog()

    def save(name: str, finished_epoch: bool = False) -> None:
        if main_process:
            logged.write(csv_path, writer, progress)
            averaged = {"raw_model": model.state_dict(), "ema_updates": ema.updates} if ema else {}
            save_checkpoint(out / name, deployed, config, **averaged, optimizer=optimizer.state_dict(),
                            lr_scheduler=scheduler.state_dict(),
                            epoch=epoch + 1 if finished_epoch else epoch,
                            step_in_epoch=0 if finished_epoch else step_in_epoch,
                            global_step=global_step, best_ap=best_ap, rng=_rng_state(),
                            training_parts=trainer.training_parts(),
                            options={k: v for k, v in asdict(opts).items() if v is not None}, metrics=metrics)

    out_of_budget = bool(opts.max_steps) and global_step >= opts.max_steps  # steps or time spent
    steps_here, paced = 0, False  # this process's steps; whether the time limit's end was foretold
    while epoch < opts.epochs and not out_of_budget:
        sampler.epoch, sampler.start_batch = epoch, step_in_epoch
        progress = _progress(loader, main_process, epoch, opts.epochs)
        seen, tick = 0, time.monotonic()
        for images, mask, targets in progress:
            images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            losses = train_step(net, trainer, criterion, optimizer, scaler, opts.clip_max_norm, images, mask, targets)
            if ema:
                ema.update(model)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step trained with
            step_in_epoch += 1
            global_step += 1
            # the share of --time-limit spent, the largest of the processes' (they must agree)
            spent = _rank_max((time.monotonic() - start) / (opts.time_limit * 60), world, device) \
                if opts.time_limit else 0.0
            if opts.schedule != "step":
                schedule.spent = max(schedule.spent, spent)
            elif opts.drop_at and schedule.time_drop_step == math.inf and spent > opts.drop_at:
                schedule.time_drop_step = global_step
                log.info("%.0f%% of the time limit passed: learning rate x0.1 from step %d on",
                         100 * opts.drop_at, global_step + 1)
            scheduler.step()
            seen += len(targets) * world
            steps_here += 1
            if opts.time_limit and not paced and spent >= PACE_SHARE:
                paced, end = True, time_limit_end(global_step, steps_here, spent)
                if end < run_steps:  # a slow machine: say so early, not at the end
                    log.info("at %.1f images/s the %g-minute limit stops this run near step %d of %d "
                             "(evaluations not counted)", steps_here * opts.batch_size * world
                             / (spent * opts.time_limit * 60), opts.time_limit, end, run_steps)
            if main_process:
                logged.write(csv_path, writer, progress)  # the previous step's, now on the host
                logged.add({"step": global_step, "epoch": epoch, "lr": lr,
                            "images_per_s": seen / max(time.monotonic() - tick, 1e-9)}, losses)
            if opts.save_every and global_step % opts.save_every == 0:
                save("last.pth")
            if (opts.max_steps and global_step >= opts.max_steps) or spent >= 1:
                out_of_budget = True
                break
        logged.write(csv_path, writer, progress)
        finished = not out_of_budget
        last_epoch = epoch + 1 >= opts.epochs
        if main_process and (out_of_budget or last_epoch or (opts.eval_every and (epoch + 1) % opts.eval_every == 0)):
            scored = {prefix: evaluate(deployed, dataset, batch_size=max(1, opts.batch_size), device=device)
                      for prefix, dataset in val_sets.items()}
            metrics = scored.pop("")
            log.info("epoch %d: AP %.3f AP50 %.3f (%s)", epoch, metrics["AP"], metrics["AP50"], _elapsed(start))
            other = {}
            for prefix, scores in scored.items():
                other.update({prefix + k: v for k, v in scores.items() if not k.startswith(("AP_", "AR"))})
                log.info("  %s: AP %.3f AP50 %.3f", prefix.rstrip("_"), scores["AP"], scores["AP50"])
            _log_row(out / "eval.csv", {"step": global_step, "epoch": epoch,
                                        "minutes": (time.monotonic() - start) / 60, **metrics, **other}, writer)
            if metrics["AP"] > best_ap:
                best_ap = metrics["AP"]
                save("best.pth", finished_epoch=finished)
        save("last.pth", finished_epoch=finished)
        if finished:
            epoch, step_in_epoch = epoch + 1, 0
        if world > 1:
            dist.barrier()
    if writer:
        writer.close()
    return metrics


class LossLog:
    """A step's losses reach the CSV one step late: copied to the host without waiting
    (one copy for all), read after the next step's matching has synchronised anyway, so
    logging adds no synchronisation to a CUDA step (`float(loss)` per term would add one
    each). Flushed before every checkpoint, so the CSV holds every step a checkpoint has."""

    def __init__(self):
        self.pending = None

    def add(self, row: dict, losses: dict) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()])
        host = torch.empty(values.shape, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event() if values.is_cuda else None
        if copied is not None:
            copied.record(torch.cuda.current_stream(values.device))
        self.pending = row, list(losses), host, copied

    def write(self, csv_path: Path, writer, progress) -> None:
        if self.pending is None:
            return
        row, names, host, copied = self.pending
        if copied is not None and not copied.query():  # still on its way: before a checkpoint, after a step
            copied.synchronize()                       # that matched nothing (and so did not wait)
        self.pending = None
        row = {**row, **dict(zip(names, host.tolist()))}
        _log_row(csv_path, row, writer)
        progress.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['loss_ce']:.3f}", l1=f"{row['loss_bbox']:.3f}",
                             giou=f"{row['loss_giou']:.3f}", img_s=f"{row['images_per_s']:.1f}")


def _drop_step(opts: TrainOptions, batches: int) -> float:
    """The step of the x0.1 drop the options fix in steps: the epoch drop or --drop-at of --max-steps."""
    by_steps = math.ceil(opts.drop_at * opts.max_steps) if opts.drop_at and opts.max_steps else math.inf
    return min(opts.lr_drop * batches, by_steps)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state loaded from a checkpoint keeps the memory order it was saved in; torch's
    fused CPU AdamW computes wrong updates where a state's order differs from its parameter's
    (a checkpoint saved while a layer trained channels-last, resumed after it changed)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def time_limit_end(step: int, steps_here: int, spent: float) -> int:
    """The step at which --time-limit stops a run that is at `step`, having taken `spent`
    of the limit for its `steps_here` steps in this process, if the pace holds."""
    return step + round(steps_here * (1 - spent) / spent)


def _rank_max(value: float, world: int, device) -> float:
    """The largest of the processes' values: ranks must stop, and set their rates, alike or DDP hangs or drifts."""
    if world == 1:
        return value
    tensor = torch.tensor(float(value), device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _elapsed(start: float) -> str:
    return f"{(time.monotonic() - start) / 60:.1f} min"


def _progress(loader, enabled: bool, epoch: int, epochs: int):
    from tqdm import tqdm
    # on a terminal only (disable=None): logs and CI get the CSV and the per-epoch lines instead
    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=None if enabled else True, dynamic_ncols=True,
                leave=False)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: CSV always
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log_row(path: Path, row: dict, writer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(row))
        if new:
            out.writeheader()
        out.writerow(row)
    if writer is not None:
        for key, value in row.items():
            if key not in ("step", "epoch"):
                writer.add_scalar(f"{path.stem}/{key}", value, row["step"])
