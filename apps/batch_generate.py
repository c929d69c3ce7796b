"""Batch generation from a prompt file: data-parallel over processes, resumable, with a JSONL manifest.

Every process launched by `accelerate launch` or `torchrun` (one or several nodes; a plain
`python` run is a world of one) reads the whole prompt file, groups the items into batches of
equal settings (the same batches whatever the world size), drops the batches already done and
takes every `world_size`-th of the rest; a partly done batch is made again in full and only its
missing items are written. Item `i` is seeded with `seed + i` unless it names its own seed,
through its own CPU generator, and is always made in the same batch, so 1 or N processes give
bit-identical images where every process does the same arithmetic: on a CPU, the same number
of threads (`torchrun` starting several processes sets OMP_NUM_THREADS=1 unless it is set, a
plain run uses one per core, and 1 against 2 threads changed one pixel value by 1 in 6 of 40
images); on GPUs, the same GPU model and software (not measured). Another `--batch-size`
changes the batches, and with them an image's last bits.

Writes are ordered so that a kill loses at most the items in flight: an image is written to
a temporary file and renamed into place, then one full line is appended (flushed, fsynced)
to this rank's `manifest.rank{R}.jsonl`. An item counts as done when a shard records it with
status "ok" and its image reads to its end (a cut-short file is made again); items are matched by their prompt, seed and settings, not by
the model or preset, so use one output folder per job. Rank 0 merges the shards into `manifest.jsonl` at the end.
The exit status is 1 when any item of the run failed (after all the others are done), else 0.
Across several nodes, `--out` must be a folder that every node sees (a shared filesystem).

A preset with torch.compile compiles once for every rank: its portable compile artifacts
(`RuntimeConfig.compile_cache`) go to `OUT/.compile-artifacts`. With several processes, rank 0
accelerates first and makes one batch of every distinct shape among the pending batches (the
images dropped), so its compile saves them; the other ranks wait for it, then load them instead of
compiling; a re-run of the job loads them too.

    accel batch prompts.txt --model path/to/pipeline --out images/ --batch-size 4 --preset fast
    torchrun --nproc_per_node 8 -m apps.cli batch prompts.jsonl --model ... --out images/
    accelerate launch --num_processes 8 -m apps.cli batch prompts.csv --model ... --out images/

(`accelerate launch --cpu` starts one process unless given an MPI host file; for several CPU
processes on one host use `torchrun`, which runs them over gloo.)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from apps.checks import (
    SettingError,
    check_args,
    check_at_least,
    check_preset,
    check_setting,
    check_size_limit,
    check_size_multiple,
    check_writable_folder,
)

MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.rank*.jsonl"
FORMATS = ("txt", "jsonl", "csv")
# Per-item fields a JSONL object or a CSV column may set; "negative" is accepted for negative_prompt.
ITEM_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width")
_ALIASES = {"negative": "negative_prompt"}


class PromptFileError(SettingError):
    """A prompt file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class Item:
    index: int
    line: int
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int | None
    guidance: float
    height: int | None
    width: int | None

    @property
    def file(self) -> str:
        return f"{self.index:06d}.png"

    @property
    def batch_key(self) -> tuple:
        # Items batch together only when one pipeline call can serve them all; SDXL encodes a
        # missing negative prompt as zeros but "" as text, so absence is part of the key.
        return (self.steps, self.guidance, self.height, self.width, self.negative_prompt is None)

    @property
    def key(self) -> str:
        """Identifies the item's content, so a changed prompt file is not mistaken for done work."""
        fields = asdict(self)
        del fields["line"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading the prompt file


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "txt"


def _convert(name: str, value, where: str):
    """Check and convert one field's value; `where` names the file and line for the error."""
    if name in ("prompt", "negative_prompt"):
        if value is not None and not isinstance(value, str):
            raise PromptFileError(f"{where}: {name} must be a string, got {value!r}")
    elif value is not None:
        kind, expected = (float, "a number") if name == "guidance" else (int, "an integer")
        if isinstance(value, str):  # CSV cells
            try:
                value = kind(value.strip())
            except ValueError:
                raise PromptFileError(f"{where}: {name} must be {expected}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise PromptFileError(f"{where}: {name} must be {expected}, got {value!r}")
        value = kind(value)
    try:  # the ranges `accel batch`'s flags and `accel generate` are held to
        return check_setting(name, value, f"{where}: {name}")
    except SettingError as err:
        raise PromptFileError(str(err)) from None


def _fields(record: dict, where: str) -> dict:
    out = {}
    for name, value in record.items():
        name = _ALIASES.get(name, name)
        if name not in ITEM_FIELDS:
            raise PromptFileError(f"{where}: unknown field {name!r}; valid fields: {', '.join(ITEM_FIELDS)}")
        out[name] = _convert(name, value, where)
    if "prompt" not in out:
        raise PromptFileError(f"{where}: no prompt")
    return out


def _rows(path: Path, fmt: str):
    """Yield (line number, fields) for each item of the file."""
    # utf-8-sig: spreadsheets often start CSV files with a byte-order mark.
    with open(path, newline="" if fmt == "csv" else None, encoding="utf-8-sig") as f:
        if fmt == "txt":
            for n, text in enumerate(f, start=1):
                text = text.rstrip("\r\n")
                if text.strip():
                    yield n, {"prompt": text}
        elif fmt == "jsonl":
            for n, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{path}: line {n}"
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise PromptFileError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield n, _fields(record, where)
        else:
            reader = csv.DictReader(f)
            header = [_ALIASES.get(h.strip(), h.strip()) for h in (reader.fieldnames or [])]
            if "prompt" not in header:
                found = ", ".join(reader.fieldnames or []) or "nothing"
                raise PromptFileError(f"{path}: line 1: the CSV header has no 'prompt' column (found: {found})")
            reader.fieldnames = header
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if None in row:
                    raise PromptFileError(f"{where}: more cells than the header has columns")
                if all(not (v or "").strip() for v in row.values()):
                    continue
                # An empty cell means "use the default", like a missing JSONL key.
                yield reader.line_num, _fields({k: v for k, v in row.items() if v not in (None, "")}, where)


def read_prompts(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    seed: int = 0,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[Item]:
    """All items of a prompt file, checked in full before any work; defaults fill what a line leaves out.

    Item `i` (0-based, blank lines not counted) gets seed `seed + i` unless it sets its own.
    """
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise PromptFileError(f"unknown prompt file format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist" if not path.exists() else f"{path} is not a file")
    defaults = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height, width=width)
    items = []
    try:
        for line, fields in _rows(path, fmt):
            index = len(items)
            values = {**defaults, "seed": seed + index, **fields}
            if "seed" not in fields:
                try:
                    check_setting("seed", values["seed"], f"{path}: line {line}: seed {seed} + item index {index} =")
                except SettingError as err:
                    raise PromptFileError(str(err)) from None
            items.append(Item(index=index, line=line, **values))
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err.reason})") from None
    except csv.Error as err:
        raise PromptFileError(f"{path}: bad CSV ({err})") from None
    if not items:
        raise PromptFileError(f"{path} has no prompts")
    return items


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Items grouped by equal settings, in order of first appearance, `batch_size` at most per group."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.batch_key, []).append(item)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# ---------------------------------------------------------------------------------------------
# The manifest


def shard_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"manifest.rank{rank}.jsonl"


def repair_shard(path: Path) -> None:
    """Cut a line torn by a kill, so the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _parse_lines(data: bytes) -> list[dict]:
    records = []
    for text in data.splitlines():
        try:
            record = json.loads(text)
        except ValueError:  # a torn last line from a killed run
            continue
        if isinstance(record, dict) and "index" in record:
            records.append(record)
    return records


def read_shards(out_dir: Path) -> tuple[list[dict], dict[Path, int]]:
    """Every record in every rank's shard (whatever world size wrote them) and each shard's size read."""
    records, sizes = [], {}
    for path in sorted(out_dir.glob(SHARD_GLOB)):
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]
        sizes[path] = len(data)
        records += _parse_lines(data)
    return records, sizes


def image_intact(path: Path) -> bool:
    """`path` is an image Pillow reads to its end: a kill or a full disk can leave a file cut short."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()  # every chunk and its checksum, without decoding the pixels
    except Exception:  # Pillow raises OSError, SyntaxError or struct.error, depending on where the file ends
        return False
    return True


def done_indices(records: list[dict], items: list[Item], out_dir: Path) -> set[int]:
    keys = {item.index: item.key for item in items}
    return {
        r["index"] for r in records
        if r.get("status") == "ok" and keys.get(r["index"]) == r.get("key")
        and image_intact(out_dir / r.get("file", ""))
    }


def merge_manifest(out_dir: Path, items: list[Item]) -> list[dict]:
    """One record per item, in item order: its latest "ok" record whose image is intact, else its latest record."""
    records, _ = read_shards(out_dir)
    keys = {item.index: item.key for item in items}
    best: dict[int, dict] = {}
    for r in sorted(records, key=lambda r: r.get("time", 0)):
        if keys.get(r["index"]) != r.get("key"):
            continue
        ok = r.get("status") == "ok" and image_intact(out_dir / r.get("file", ""))
        if ok or best.get(r["index"], {}).get("status") != "ok":
            best[r["index"]] = r
    merged = [best[i] for i in sorted(best)]
    tmp = out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in merged)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / MANIFEST)
    return merged


class ShardWriter:
    """This rank's manifest shard: one full line per item, flushed and fsynced before the next item."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class ShardTail:
    """Counts records appended to all shards since a given size of each, for rank 0's progress bar."""

    def __init__(self, out_dir: Path, sizes: dict[Path, int]):
        self.out_dir, self.offsets, self.count = out_dir, dict(sizes), 0

    def poll(self) -> int:
        for path in self.out_dir.glob(SHARD_GLOB):
            start = self.offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            data = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = start + len(data)
            self.count += len(_parse_lines(data))
        return self.count


# ---------------------------------------------------------------------------------------------
# Generation


def _save_png(array, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves a torn image at `path`."""
    import numpy as np
    from PIL import Image

    pixels = (array * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _call(pipe, batch: list[Item]):
    """One pipeline call for items of equal settings; returns float images in [0, 1], (B, H, W, C)."""
    import numpy as np
    import torch

    first = batch[0]
    kwargs = {
        "prompt": [item.prompt for item in batch],
        "guidance_scale": first.guidance,
        # One generator per item: its latents depend only on its seed, not on its batch mates.
        "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in batch],
        "output_type": "np",
    }
    if first.negative_prompt is not None:
        kwargs["negative_prompt"] = [item.negative_prompt for item in batch]
    for name in ("steps", "height", "width"):
        value = getattr(first, name)
        if value is not None:
            kwargs["num_inference_steps" if name == "steps" else name] = value
    images = pipe(**kwargs).images
    images = images.float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.ndim != 4 or len(images) != len(batch):
        raise RuntimeError(f"pipeline returned images of shape {images.shape} for {len(batch)} prompt(s)")
    return images


ARTIFACTS = ".compile-artifacts"


def shared_artifacts(config, out_dir: Path):
    """`config` with its compile artifacts kept in `out_dir` (None-safe; unchanged where nothing compiles, where the
    config names its own folder, or where it compiles in the background: its artifacts are saved only once that
    compile is over, after the call rank 0 makes for the other ranks to load from)."""
    from dataclasses import replace

    runtime = getattr(config, "runtime", None)
    if runtime is None or runtime.compile is None or runtime.compile_cache is not None or runtime.compile_background:
        return config
    return config.replace(runtime=replace(runtime, compile_cache=str(out_dir / ARTIFACTS)))


def shape_batches(batch_list: list[list[Item]]) -> list[list[Item]]:
    """One batch of each distinct compiled shape (height, width, batch size, guidance on or off) among `batch_list`."""
    seen, picked = set(), []
    for batch in batch_list:
        first = batch[0]
        shape = (first.height, first.width, len(batch), first.guidance > 1)
        if shape not in seen:
            seen.add(shape)
            picked.append(batch)
    return picked


def _free_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(pipe, batch_list: list[list[Item]], out_dir: Path, writer: ShardWriter, *, rank: int = 0,
             on_batch=None, settings: dict | None = None, done: set[int] = frozenset()) -> dict:
    """Run this rank's batches, writing each image and its manifest line as soon as it is made.

    A batch that raises is retried item by item, so one bad item (an out-of-memory size, a size
    the pipeline rejects) costs only itself; an exception or NaN pixels record status "error".
    Items whose index is in `done` are made with their batch but neither written nor recorded.
    Returns this rank's counts and the seconds spent.
    """
    import numpy as np

    stats = {"rank": rank, "ok": 0, "error": 0, "seconds": 0.0}

    def record(item: Item, status: str, latency: float, size: int, error: str | None = None) -> None:
        writer.append({
            "index": item.index, "line": item.line, "key": item.key, "prompt": item.prompt,
            "negative_prompt": item.negative_prompt, "seed": item.seed, "steps": item.steps,
            "guidance": item.guidance, "height": item.height, "width": item.width, **(settings or {}),
            "file": item.file, "latency_s": round(latency, 4), "batch_size": size, "rank": rank,
            "status": status, "error": error, "time": time.time(),
        })
        stats[status] += 1

    def run(batch: list[Item]) -> None:
        start = time.perf_counter()
        try:
            images = _call(pipe, batch)
        except Exception as err:  # an item's failure must not end the run
            _free_memory()
            if len(batch) > 1:
                for item in batch:
                    if item.index not in done:
                        run([item])
                return
            record(batch[0], "error", time.perf_counter() - start, 1, f"{type(err).__name__}: {err}")
            return
        latency = (time.perf_counter() - start) / len(batch)
        for item, image in zip(batch, images):
            if item.index in done:
                continue
            if not np.isfinite(image).all():
                record(item, "error", latency, len(batch), "non-finite (NaN or inf) pixels in the output")
                continue
            made = image.shape[:2]
            if (item.height or made[0], item.width or made[1]) != made:  # a pipeline that resizes what it is asked
                record(item, "error", latency, len(batch),
                       f"the pipeline made {made[0]}x{made[1]} pixels (height x width), not {item.height}x{item.width}")
                continue
            _save_png(image, out_dir / item.file)
            record(item, "ok", latency, len(batch))

    start = time.perf_counter()
    for batch in batch_list:
        run(batch)
        if on_batch is not None:
            on_batch()
    stats["seconds"] = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------------------------
# The command


def _gather(stats: dict, world_size: int) -> list[dict]:
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [stats]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, stats)
    return everyone


def run(args) -> int:
    """`accel batch`: see the module docstring."""
    try:  # the flags first, by the same checks as the prompt file's fields, before the heavy imports
        check_at_least("--batch-size", args.batch_size)
        check_args(args, ("seed", "steps", "guidance", "height", "width"))
        check_preset(args.preset)
    except SettingError as err:
        raise SystemExit(f"error: {err}") from None

    import torch

    import accel
    from accel.embedded import EMBEDDED_GUIDANCE, EMBEDDED_STEPS

    embedded = args.model is None
    if args.guidance is None:
        args.guidance = EMBEDDED_GUIDANCE if embedded else 7.5
    if args.steps is None and embedded and not args.preset:
        args.steps = EMBEDDED_STEPS
    out_dir = Path(args.out)
    try:  # the whole prompt file, before any model loads
        items = read_prompts(args.prompts, format=args.format, seed=args.seed, negative_prompt=args.negative_prompt,
                             steps=args.steps, guidance=args.guidance, height=args.height, width=args.width)
        check_writable_folder(out_dir, "--out")
    except SettingError as err:
        raise SystemExit(f"error: {err}") from None

    from accelerate import PartialState

    from apps.loading import pick_device

    device = pick_device(args.device)
    # accelerate sets up a CPU (gloo) process group only when told the run is on CPU.
    on_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=on_cpu)
    rank, world_size, main = state.process_index, state.num_processes, state.is_main_process
    if device == "cuda" and world_size > 1:
        device = str(state.device)  # one GPU per process: cuda:LOCAL_RANK
    if not main:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # one bar, on rank 0

    # Repair, then read, then work, each behind a barrier, so every rank sees the same records
    # and computes the same pending list.
    repair_shard(shard_path(out_dir, rank))
    if main:
        for stale in out_dir.glob(".*.tmp-*"):  # images a killed run never renamed into place
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()
    records, sizes = read_shards(out_dir)
    done = done_indices(records, items, out_dir)
    pending = [item for item in items if item.index not in done]
    state.wait_for_everyone()

    # Batches are formed from every item, whatever the world size and whatever is done, and dealt out whole
    # (strided: equal shares of mixed settings): an item is always made in the same batch, with the same shapes
    # and so the same arithmetic. A batch's items already done are made again, not written.
    pending_batches = [b for b in batches(items, args.batch_size) if any(item.index not in done for item in b)]
    mine = pending_batches[rank::world_size]
    stats = {"rank": rank, "ok": 0, "error": 0, "seconds": 0.0}
    start = time.perf_counter()
    if pending:
        from tqdm.auto import tqdm

        from apps.loading import load_pipeline, preset_config

        pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
        pipe.set_progress_bar_config(disable=True)
        try:  # a DiT's size multiple is known once it is loaded; every rank checks every item
            sizes = {"--height": args.height, "--width": args.width}
            for item in items:
                sizes.update({f"{args.prompts}: line {item.line}: {name}": getattr(item, name)
                              for name in ("height", "width") if getattr(item, name) != getattr(args, name)})
            check_size_multiple(pipe, sizes)
            check_size_limit(pipe, sizes, args.allow_large)
        except SettingError as err:
            raise SystemExit(f"error: {err}") from None
        if args.preset:
            config = shared_artifacts(preset_config(args.preset, pipe, say=main), out_dir)
            shared = world_size > 1 and config.runtime is not None and config.runtime.compile_cache is not None
            if shared and not main:
                state.wait_for_everyone()  # rank 0 compiles and saves the artifacts first
            accel.accelerate(pipe, config)
            if shared and main:
                try:
                    for batch in shape_batches(pending_batches):
                        _call(pipe, batch)  # compiles this shape and saves its artifacts at the end of the call
                except Exception as err:  # the other ranks then compile what is missing themselves
                    print(f"batch: compiling ahead of the other ranks failed ({type(err).__name__}: {err}); each "
                          "rank compiles what it needs", file=sys.stderr)
                    _free_memory()
                finally:
                    state.wait_for_everyone()
        # The bar counts every rank's items by reading the shards they append to.
        bar = tqdm(total=len(pending), desc="batch", unit="img", disable=not main or args.no_progress)
        tail = ShardTail(out_dir, sizes)

        def on_batch():
            bar.update(tail.poll() - bar.n)

        start = time.perf_counter()
        writer = ShardWriter(shard_path(out_dir, rank))
        try:
            stats = generate(pipe, mine, out_dir, writer, rank=rank, on_batch=on_batch if main else None,
                             settings={"model": args.model, "preset": args.preset}, done=done)
        finally:
            writer.close()
            if accel.is_accelerated(pipe):
                accel.restore(pipe)  # the process settings a compile changed go back (a caller in this process)
        state.wait_for_everyone()
        on_batch()
        bar.close()
    wall = time.perf_counter() - start
    stats["threads"] = torch.get_num_threads()  # on a CPU, part of what makes an image's last bits
    everyone = _gather(stats, world_size)
    if main:
        merged = merge_manifest(out_dir, items)
        ok = sum(r["status"] == "ok" for r in merged)
        errors = [r for r in merged if r["status"] != "ok"]
        made = sum(s["ok"] for s in everyone)
        if pending:
            print(f"batch: {len(items)} items, {len(done)} already done, {len(pending)} run on {world_size} process(es): "
                  f"{made} images in {wall:.2f} s, {made / wall if wall > 0 else 0.0:.2f} images/s overall")
            for s in everyone:
                rate = s["ok"] / s["seconds"] if s["seconds"] > 0 else 0.0
                threads = f", {s['threads']} CPU thread(s)" if device == "cpu" else ""
                print(f"  rank {s['rank']}: {s['ok']} images, {s['error']} errors, {rate:.2f} images/s{threads}")
        else:
            print(f"batch: all {len(items)} items already done")
        print(f"manifest: {out_dir / MANIFEST} ({ok} ok, {len(errors)} error)")
        for r in errors[:10]:
            print(f"  item {r['index']} (line {r['line']}): {r['error']}")
    state.wait_for_everyone()
    # Every rank knows every rank's count, so all exit alike; a re-run retries only the failed items.
    failed = sum(s["error"] for s in everyone)
    if failed and main:
        print(f"batch: {failed} item(s) failed; exit status 1", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    import argparse

    from apps.arguments import add_batch_arguments

    parser = argparse.ArgumentParser(prog="accel batch")
    add_batch_arguments(parser)
    sys.exit(run(parser.parse_args()))
