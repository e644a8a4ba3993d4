"""Whether a run can resume where it would, read from the checkpoint's index (no unpickling) before any process
starts: a model, loss, table, data split or validation classes of another shape or choice, or a world size at which
DeepSpeed cannot load the ZeRO-1/2 optimizer state."""
from __future__ import annotations

from dist_dml.train.checkpoints import CheckpointError, read_meta, resume_target


def resume_problem(config, world_size: int | None = None) -> str | None:
    """Why a run with this config (at ``world_size`` processes, where given) cannot resume where it would; None
    if it can.

    Read from the checkpoint's index (no unpickling), before any process starts: no whole checkpoint where one
    is expected; a model, loss, beta table, memory or data split of another shape; or a world size at which
    DeepSpeed cannot load the ZeRO-1/2 optimizer state. (Another world size resumes otherwise: ZeRO-1/2 state
    is converted by the CheckpointManager, the data position cut over the new slots.)
    """
    try:
        target = resume_target(config.checkpoint, config.train.output_dir)
    except CheckpointError as exc:
        return str(exc)
    if target is None:
        return None
    how = ("checkpoint.resume=auto found " if config.checkpoint.resume == "auto" else
           f"checkpoint.resume={config.checkpoint.resume}: ")
    fresh = ("; to start afresh instead, give another train.name (or train.output_dir), or checkpoint.resume=none "
             "train.move_aside=true (which moves the earlier run's files into OUTPUT/previous/ first)")
    meta = read_meta(target)
    saved = meta.get("config", {})
    for section, key in (("model", "backbone"), ("model", "embedding_dim"), ("loss", "kind"),
                         ("loss", "beta_per_class"), ("loss", "beta_per_image"), ("deepspeed", "zero_stage")):
        if section in saved and key in saved[section]:
            was, now = saved[section][key], getattr(getattr(config, section), key)
            if was != now:
                return f"{how}{target}, saved with {section}.{key}={was}, but this run has {now}{fresh}"
    saved_data = saved.get("data", {})
    holds_out = bool(saved_data.get("val_share", 0.0) or config.data.val_share)
    for key, default, why in (("val_share", 0.0, holds_out), ("val_seed", 0, holds_out),
                              ("val_split", "", config.checkpoint.best_by != "none")):
        was, now = saved_data.get(key, default), getattr(config.data, key)
        if was != now and why:
            return (f"{how}{target}, saved with data.{key}={was!r}, but this run has {now!r}: the validation classes "
                    f"would change{' (and the training records with them)' if key != 'val_split' else ''}{fresh}")
    centres = meta.get("centres", {})
    if centres.get("kind") and config.proxy.enabled and centres["kind"] != config.proxy.kind:
        return (f"{how}{target}, whose class centres were trained for proxy.kind={centres['kind']}, but this run has "
                f"{config.proxy.kind}{fresh}")
    was_decay = saved.get("optimizer", {}).get("layer_decay", 1.0)
    if (was_decay < 1) != (config.optimizer.layer_decay < 1):  # the optimizer state's param groups
        return (f"{how}{target}, saved with optimizer.layer_decay={was_decay}, but this run "
                f"has {config.optimizer.layer_decay}: the backbone's param groups differ (one per layer, or one){fresh}")
    for was, now, what in _saved_sizes(meta, config):
        if was != now:
            return f"{how}{target}, saved with {what} {was}, but this run's is {now}{fresh}"
    problem = _world_size_problem(meta, config, world_size)
    return f"{how}{target}: {problem}" if problem else None


def _saved_sizes(meta: dict, config) -> list[tuple[int, int, str]]:
    """(saved, this run's, what) for each table whose size the checkpoint's index records: the memory (where both
    runs have one: a run that adds or drops it starts or leaves it), the class centres (likewise), the beta tables
    (sized from the split where loss.num_classes / num_images / proxy.num_classes are 0) and the data position's
    records."""
    from dist_dml.data import Manifest

    sizes = []
    memory = meta.get("memory", {}).get("size")
    if memory and config.memory.size:
        sizes.append((int(memory), config.memory.size, "memory.size of"))
    shapes, data = meta.get("shapes", {}), meta.get("data", {})
    if not (shapes or data) or not config.data.root:
        return sizes
    try:
        split = Manifest(config.data.root, config.data.max_manifest_mb).split(config.data.train_split)
    except (OSError, KeyError, ValueError):
        return sizes  # the config check reports the data
    loss = config.loss
    centres = meta.get("centres", {}).get("num_classes")
    if centres and config.proxy.enabled:
        sizes.append((int(centres), config.proxy.num_classes or int(split["classes"]), "class centres (proxy) of"))
    if shapes.get("beta_classes") and loss.beta_per_class:
        sizes.append((int(shapes["beta_classes"]), loss.num_classes or int(split["classes"]),
                      "a per-class beta table of size"))
    if shapes.get("beta_images") and loss.beta_per_image:
        sizes.append((int(shapes["beta_images"]), loss.num_images or int(split["images"]),
                      "a per-image beta table of size"))
    if data.get("records"):
        records = sum(int(shard["records"]) for shard in split["shards"])
        sizes.append((int(data["records"]), records, f"a data position over a {config.data.train_split!r} "
                      "split (data.root, data.train_split) whose record count is"))
    return sizes


def _world_size_problem(meta: dict, config, world_size: int | None) -> str | None:
    """Why DeepSpeed could not load the checkpoint's ZeRO-1/2 optimizer state at ``world_size`` processes.

    At another world size the state is converted to a universal checkpoint, which DeepSpeed 0.19 cannot load on a
    rank that holds no element of a param group followed by one it does hold elements of (IndexError; a group
    empty on a rank *after* all its non-empty ones is left out: patches.universal_load_past_trailing_empty_groups).
    ZeRO-1/2 pads each group's flat tensor to a multiple of 2 x world_size and gives each rank an equal slice,
    so the ranks past a small group's last element hold none of it: a small head before a large per-image beta
    table, at many ranks."""
    saved_world, stage = meta.get("world_size"), int(meta.get("zero_stage", config.deepspeed.zero_stage))
    groups = [(name[len("group_"):], int(n)) for name, n in meta.get("shapes", {}).items() if name.startswith("group_")]
    if not world_size or stage == 0 or saved_world in (None, world_size) or not groups:
        return None
    blocked = _group_empty_before_another(groups, world_size)
    if blocked is None:
        return None
    name, n, empty_from, later = blocked
    fits = next(w for w in range(world_size - 1, 0, -1) if _group_empty_before_another(groups, w) is None)
    return (f"saved at {saved_world} processes under ZeRO-{stage}; at {world_size} the {name} param group ({n} "
            f"elements) leaves ranks {empty_from} to {world_size - 1} without an element while they hold some of the "
            f"{later} group, which DeepSpeed cannot load; resume with at most {fits} processes, or with {saved_world}")


def _group_empty_before_another(groups: list[tuple[str, int]], world_size: int) -> tuple[str, int, int, str] | None:
    """(group, its elements, the first rank without any, a later group that rank holds elements of), or None."""
    empty_from = [first_rank_without_elements(n, world_size) for _, n in groups]
    for i, ((name, n), first) in enumerate(zip(groups, empty_from)):
        later = [groups[j][0] for j in range(i + 1, len(groups)) if empty_from[j] > first]
        if first < world_size and later:
            return name, n, first, later[0]
    return None


def first_rank_without_elements(numel: int, world_size: int) -> int:
    """The first rank whose ZeRO-1/2 slice of a param group of ``numel`` elements is padding alone (world_size if
    none): the group is padded to a multiple of 2 x world_size and cut into world_size equal slices."""
    alignment = 2 * world_size
    per_rank = -(-numel // alignment) * alignment // world_size
    return min(world_size, -(-numel // per_rank))
