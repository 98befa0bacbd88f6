"""Sharded, resumable sampling of N images for evaluation (single process or ``torchrun``).

The job is cut into shards of ``batch_size`` consecutive global indices. Shard ``k`` always holds images
``k*B .. k*B+B-1`` with labels from a fixed global label plan and a generator seeded from ``(seed, k)``, so
what a shard contains does not depend on how many processes run. Rank 0 lists the shards not yet on disk
and rank ``r`` of ``W`` samples every ``W``-th of them from the ``r``-th, so a resumed job is rebalanced over
the processes it has now. Every shard is written atomically (temp file, fsync, rename) as soon as it is
done; a killed job re-run with the same arguments skips the finished shards and resamples empty or truncated
ones, so no sample is lost or duplicated, even with a different number of processes. A lock file
(``<out>/.lock``) keeps a second job off the folder. Rank 0 then packs the shards in index order into an ADM
``.npz``.

This follows LlamaGen's ``sample_c2i_ddp.py`` (rank-sharded seeds, rank 0 packs ``arr_0``), with two
changes: seeds are per shard instead of per rank (world-size independent), and there is no
oversampling to a multiple of the global batch (the last shard is just shorter).
"""

from __future__ import annotations

import datetime
import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from genaccel.utils.dtypes import canonical_dtype
from genaccel.utils.io import stored_path

SHARD_DIR = "shards"
JOB_FILE = "job.json"
SAMPLES_FILE = "samples.npz"
MODEL_PATH_KEYS = ("ckpt", "vq_ckpt")


def canonical_model_spec(model: dict) -> dict:
    """A job's ``model`` entry with checkpoint paths absolute and the dtype canonical, so that a job resumes
    whichever spelling of the same file or dtype is typed (and job files written before, with the path as
    typed and ``float32``-style dtypes, still match when resumed from the folder they were started in)."""
    out = dict(model)
    for key in MODEL_PATH_KEYS:
        if out.get(key) is not None:
            out[key] = stored_path(out[key])
    if out.get("dtype") is not None:
        out["dtype"] = canonical_dtype(out["dtype"])
    return out


@dataclass
class SampleJob:
    """What to sample. Everything except ``out_dir`` must match when a job is resumed."""

    out_dir: str
    num_images: int
    batch_size: int = 16
    seed: int = 0
    labels: str = "balanced"  # 'balanced' (classes cycled) or 'random' (uniform over classes)
    classes: list[int] | None = None
    sampler: str = "ar"
    sampler_options: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # how the pipeline was built (checkpoint paths, image size)
    continuous_batching: bool = False  # a rank's shards as one continuous-batching stream (sample_shards)

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.labels not in ("balanced", "random"):
            raise ValueError(f"labels must be 'balanced' or 'random', got {self.labels!r}")

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.batch_size)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("out_dir")
        if not d["continuous_batching"]:  # jobs written before the option existed resume unchanged
            d.pop("continuous_batching")
        return d

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.batch_size, min((k + 1) * self.batch_size, self.num_images)

    def shard_path(self, k: int) -> Path:
        return self.out / SHARD_DIR / f"shard_{k:06d}.npz"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors must live: the rank's GPU for nccl, the CPU otherwise."""
        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else torch.device("cpu")


def init_distributed(timeout_min: float = 180.0) -> DistInfo:
    """Join the ``torchrun`` process group if there is one: nccl with CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                    backend=dist.get_backend())


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group cleanly (a rank exiting with a live gloo group can abort at shutdown)."""
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier(device_ids=[info.local_rank] if info.backend == "nccl" else None)


def sum_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Element-wise sum of a dict of numbers over all ranks (every rank gets the result)."""
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.comm_device)
    if info.world > 1:
        dist.all_reduce(local)
    return dict(zip(keys, local.cpu().tolist()))


def label_plan(num_classes: int, job: SampleJob) -> torch.Tensor:
    """Global labels (N,): classes cycled in order ('balanced') or drawn uniformly with the job seed."""
    from genaccel.pipeline import labels_for

    classes = job.classes or list(range(num_classes))
    balanced = labels_for(num_classes, classes, job.num_images)  # also validates the class ids
    if job.labels == "balanced":
        return balanced
    rng = np.random.default_rng([job.seed, 7])
    return torch.as_tensor(rng.choice(np.asarray(classes), size=job.num_images), dtype=torch.long)


def shard_seed(seed: int, k: int) -> int:
    """Seed of shard ``k``: depends only on (job seed, shard index), never on rank or world size."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] % (2**63))


def shards_for_rank(job: SampleJob, info: DistInfo, todo: list[int] | None = None) -> list[int]:
    """Rank ``r``'s share of ``todo`` (default: all shards): every ``world``-th entry from ``r``. Passing the
    missing shards rebalances a resumed job over the current world size."""
    todo = list(range(job.num_shards)) if todo is None else todo
    return todo[info.rank::info.world]


def shard_done(job: SampleJob, k: int) -> bool:
    """Whether shard ``k`` is on disk and complete, reading only its small ``indices`` array (not the images);
    a zero-length, truncated or foreign file counts as not done and is resampled."""
    path = job.shard_path(k)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    start, end = job.shard_range(k)
    try:
        with np.load(path) as z:
            if not {"images", "labels", "indices", "stats"} <= set(z.files):
                return False
            member = zipfile.ZipFile(path).getinfo("images.npy")
            indices = z["indices"]
    except Exception:  # noqa: BLE001 - any unreadable shard is simply sampled again
        return False
    return member.file_size > 0 and np.array_equal(indices, np.arange(start, end))


def missing_shards(job: SampleJob, info: DistInfo) -> list[int]:
    """Shards still to sample, decided by rank 0 and broadcast, so every rank splits the same list even while
    others start writing."""
    todo = [[k for k in range(job.num_shards) if not shard_done(job, k)] if info.is_main else None]
    if info.world > 1:
        dist.broadcast_object_list(todo, src=0, device=info.comm_device if info.backend == "nccl" else None)
    return todo[0]


def read_shard(job: SampleJob, k: int) -> dict | None:
    """A finished shard's arrays, or None if it is absent or not a complete shard of this job."""
    path = job.shard_path(k)
    if not path.is_file():
        return None
    start, end = job.shard_range(k)
    try:
        with np.load(path) as z:
            data = {key: z[key] for key in z.files}
    except Exception:  # noqa: BLE001 - zero-length (EOFError), truncated or foreign files are not shards
        return None
    if data.get("indices") is None or not np.array_equal(data["indices"], np.arange(start, end)):
        return None
    return data


def write_shard(job: SampleJob, k: int, images: torch.Tensor, labels: torch.Tensor, stats) -> Path:
    """Atomically write shard ``k`` (images uint8 NHWC, labels, global indices, sampler stats as JSON)."""
    from genaccel.utils.io import atomic_write

    start, end = job.shard_range(k)
    arrays = {"images": images.numpy(), "labels": labels.cpu().numpy(), "indices": np.arange(start, end),
                  "stats": np.array(json.dumps(stats.to_dict()))}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(job.shard_path(k), write)


def remove_stale_temp_files(job: SampleJob) -> int:
    """Delete temp files a killed run left behind (only safe before any rank starts writing)."""
    stale = list((job.out / SHARD_DIR).glob(".shard_*.tmp")) if (job.out / SHARD_DIR).is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


LOCK_FILE = ".lock"


class JobLocked(ValueError):
    """Another live process is writing this job folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_job_lock(out: str | os.PathLike) -> Path:
    """Create ``<out>/.lock`` (pid, host, start time) exclusively; a second job on the same folder is refused
    with one line naming the holder, and a lock left by a dead process on this host is taken over.

    Orphaned ``torchrun`` workers (started in their own sessions) keep sampling after their launcher dies;
    the lock makes a new job wait for them instead of writing the same shards at once."""
    import socket

    path = Path(out) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not holder:  # being written by a process that just created it
                time.sleep(0.2)
                continue
            raise JobLocked(
                f"{Path(out)} is in use by another sampling job (pid {pid} on {host}, since {holder.get('started')}); "
                f"wait for it or stop it (kill {pid}), or choose another --out; a lock of a dead process is taken "
                f"over automatically ({path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise JobLocked(f"could not take the lock {path}; remove it if no job is running")


def release_job_lock(out: str | os.PathLike) -> None:
    """Remove ``<out>/.lock`` if this process holds it."""
    path = Path(out) / LOCK_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def prepare_job_dir(job: SampleJob, info: DistInfo) -> None:
    """Rank 0 takes the folder's lock and records the job; every rank then checks that an existing job
    directory holds this same job. A lock held by another live job is an error on every rank."""
    path = job.out / JOB_FILE
    failure = None
    if info.is_main:
        try:
            acquire_job_lock(job.out)
        except JobLocked as e:
            failure = e
    if sum_across_ranks({"locked": float(failure is not None)}, info)["locked"]:
        raise failure or JobLocked(f"{job.out} is in use by another sampling job (see rank 0's error)")
    if info.is_main:
        remove_stale_temp_files(job)
        if not path.exists():
            from genaccel.utils.io import save_json

            save_json(job.fingerprint(), path)
    barrier(info)
    recorded = json.loads(path.read_text())
    if isinstance(recorded.get("model"), dict):
        recorded["model"] = canonical_model_spec(recorded["model"])
    if recorded != json.loads(json.dumps(job.fingerprint())):
        changed = sorted(k for k in set(recorded) | set(job.fingerprint()) if recorded.get(k) != job.fingerprint().get(k))
        raise ValueError(
            f"{job.out} already holds a different sampling job (fields differ: {changed}); resume it with the same "
            "arguments, or choose a new --out directory"
        )


def sample_shards(pipeline, sampler, job: SampleJob, info: DistInfo, progress: bool = True,
                  continuous: bool | None = None) -> dict:
    """Sample this rank's share of the missing shards (rebalanced over the current world size); returns counts
    and the wall time spent sampling (+ decoding).

    ``continuous`` (default: the job's ``continuous_batching``): the rank's shards run as one
    continuous-batching stream of ``batch_size`` rows (``Sampler.generate_stream``), seeded from its first
    shard, and each shard is decoded and written as soon as its last image completes, so an interrupted
    stream loses only the images in flight and the end-of-stream tail (rows emptying as no label waits) is
    paid once per rank, not per group of shards. The images keep their labels and, for exact samplers, their
    distribution; which draws an image gets depends on the shards streamed with it (reproducible given the
    seed, the batch size and the shards missing per rank). Shard stats: :func:`shard_stats_of_images`.
    """
    continuous = job.continuous_batching if continuous is None else continuous
    labels = label_plan(pipeline.num_classes, job)
    missing = missing_shards(job, info)
    todo = shards_for_rank(job, info, missing)
    resumed = job.num_shards - len(missing) if info.is_main else 0  # counted once, summed over ranks later
    device = next(pipeline.gpt.parameters()).device
    start = time.perf_counter()
    if continuous and todo:
        images = _stream_shards(pipeline, sampler, job, info, todo, labels, device, progress)
    else:
        images = 0
        for k in tqdm(todo, desc=f"sampling rank {info.rank}/{info.world}", disable=not progress,
                      position=info.rank):
            s, e = job.shard_range(k)
            gen = torch.Generator(device=device).manual_seed(shard_seed(job.seed, k))
            out = sampler.generate(pipeline.gpt, labels[s:e].to(device), gen)
            # a flow decoder's noise continues the shard's generator, so a resumed shard decodes the same
            write_shard(job, k, pipeline.decode(out.tokens, gen), labels[s:e], out.stats)
            images += e - s
    return {"shards_assigned": len(todo), "shards_sampled": len(todo), "shards_resumed": resumed,
            "images_sampled": images, "wall_time_s": time.perf_counter() - start}


def _stream_shards(pipeline, sampler, job: SampleJob, info: DistInfo, todo: list[int], labels: torch.Tensor,
                   device, progress: bool) -> int:
    """One stream over shards ``todo``; each shard written when complete (see :func:`sample_shards`)."""
    ranges = [job.shard_range(k) for k in todo]
    chunk = torch.cat([labels[s:e] for s, e in ranges])
    owner = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(ranges)])  # stream image -> todo entry
    first = np.cumsum([0] + [e - s for s, e in ranges])
    left = [e - s for s, e in ranges]
    tokens = [None] * chunk.numel()
    forwards = torch.zeros(chunk.numel(), dtype=torch.float64)
    charge = torch.zeros(chunk.numel(), dtype=torch.float64)
    last = {"time": time.perf_counter(), "stats": None}
    bar = tqdm(total=chunk.numel(), desc=f"sampling rank {info.rank}/{info.world} (continuous)", unit="image",
               disable=not progress, position=info.rank)

    def write_complete(done) -> None:
        bar.update(done.index.numel())
        for j, i in enumerate(done.index.tolist()):
            tokens[i], forwards[i], charge[i] = done.tokens[j], done.forwards[j], done.charge[j]
            left[int(owner[i])] -= 1
        for t in sorted({int(owner[i]) for i in done.index.tolist()}):
            if left[t] == 0:
                k, (s, e), a = todo[t], ranges[t], int(first[t])
                now = time.perf_counter()
                stats = shard_stats_of_images(done.stats, last["stats"], forwards[a : a + e - s],
                                              charge[a : a + e - s], job.batch_size, chunk.numel(),
                                              now - last["time"])
                last.update(time=now, stats=dict(target=done.stats.target_time_s, draft=done.stats.draft_time_s,
                                                 draft_forwards=done.stats.draft_forwards))
                # decode noise (a flow decoder) from the shard's own generator: a resumed shard decodes alike
                gen = torch.Generator(device=device).manual_seed(shard_seed(job.seed, k) ^ DECODE_SEED_SALT)
                write_shard(job, k, pipeline.decode(torch.stack(tokens[a : a + e - s]), gen), labels[s:e], stats)
                tokens[a : a + e - s] = [None] * (e - s)  # written: a rank's whole stream is never held at once

    gen = torch.Generator(device=device).manual_seed(shard_seed(job.seed, todo[0]))
    try:
        sampler.generate_stream(pipeline.gpt, chunk.to(device), job.batch_size, gen, on_complete=write_complete)
    finally:
        bar.close()
    unwritten = [todo[t] for t, n in enumerate(left) if n]
    if unwritten:  # a sampler must report every image; refuse to pretend the shards exist
        raise RuntimeError(f"the stream ended with shards {unwritten} incomplete: sampler {sampler.name!r} did not "
                           "report every image to on_complete")
    return chunk.numel()


DECODE_SEED_SALT = 0x5DEECE66D  # continuous streams: decode generators apart from the sampling seeds


def shard_stats_of_images(stream, before: dict | None, forwards: torch.Tensor, charge: torch.Tensor, rows: int,
                          stream_images: int, wall_s: float):
    """Stats of one shard of a stream, from its images (``CompletedImages``): ``nfe`` = ``rows`` x their mean
    share of the stream's forwards (the forwards per batch of ``rows`` images, what :func:`summarize_stats`
    averages; over all shards it is the stream's ``batch_forwards_per_image``), ``row_verify_steps`` = the
    verify steps they took part in (so ``forwards_per_image`` stays theirs); times and drafter forwards are
    the stream's since the previous shard was written (``before``: the running totals then), so they add up
    to the stream's."""
    from genaccel.samplers import SamplerStats

    before = before or {"target": 0.0, "draft": 0.0, "draft_forwards": 0}
    count = forwards.numel()
    return SamplerStats(
        nfe=rows * float(charge.mean()), tokens=stream.tokens, images=count, wall_time_s=wall_s,
        draft_forwards=stream.draft_forwards - before["draft_forwards"],
        draft_time_s=stream.draft_time_s - before["draft"], target_time_s=stream.target_time_s - before["target"],
        extra={"continuous": True, "stream_images": stream_images, "stream_rows": rows,
               "row_verify_steps": float(forwards.sum()) - count},
    )


def collect_shards(job: SampleJob) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """All shards in index order: images (N, H, W, 3), labels (N,), per-shard sampler stats."""
    parts = [read_shard(job, k) for k in range(job.num_shards)]
    missing = [k for k, p in enumerate(parts) if p is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {job.num_shards} shards are missing in {job.out / SHARD_DIR} (first: {missing[:5]}); "
            "re-run the same command to sample them"
        )
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    return images, labels, [json.loads(str(p["stats"])) for p in parts]


def pack_samples(job: SampleJob) -> tuple[Path, np.ndarray, list[dict]]:
    """Write ``samples.npz`` (ADM: ``arr_0`` uint8 NHWC, ``arr_1`` labels, uncompressed) shard by shard.

    Only one shard's images are in memory at a time (50,000 x 256^2 x 3 = 9.8 GB would otherwise sit on rank 0),
    and the file is written to a temp name, fsynced and renamed, like every other output. Returns the path,
    the labels and the per-shard sampler stats; read the images back with ``open_images(path)``."""
    from genaccel.utils.io import atomic_write

    missing = [k for k in range(job.num_shards) if not shard_done(job, k)]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {job.num_shards} shards are missing in {job.out / SHARD_DIR} (first: {missing[:5]}); "
            "re-run the same command to sample them"
        )
    with np.load(job.shard_path(0)) as z:
        image_shape, dtype = z["images"].shape[1:], z["images"].dtype
    labels, stats = [], []

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                             "shape": (job.num_images, *image_shape)})
                for k in range(job.num_shards):
                    part = read_shard(job, k)
                    if part is None or part["images"].shape[1:] != image_shape:
                        raise RuntimeError(f"shard {k} of {job.out} changed while packing; re-run the command")
                    member.write(np.ascontiguousarray(part["images"], dtype=dtype).tobytes())
                    labels.append(part["labels"].astype(np.int64))
                    stats.append(json.loads(str(part["stats"])))
            with zf.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.concatenate(labels), allow_pickle=False)

    path = atomic_write(job.out / SAMPLES_FILE, write)
    return path, np.concatenate(labels), stats


def summarize_stats(stats: list[dict]) -> dict:
    """NFE and step compression per image sequence, averaged over shards (weighted by images)."""
    images = sum(s["images"] for s in stats)
    nfe = sum(s["nfe"] * s["images"] for s in stats) / images
    tokens = sum(s["tokens"] * s["images"] for s in stats) / images
    return {"nfe_per_image": nfe, "tokens_per_image": tokens, "step_compression": tokens / max(nfe, 1e-12),
            "sampler_wall_time_s": sum(s["wall_time_s"] for s in stats)}


__all__ = [
    "DistInfo",
    "SampleJob",
    "barrier",
    "collect_shards",
    "init_distributed",
    "acquire_job_lock",
    "label_plan",
    "missing_shards",
    "pack_samples",
    "prepare_job_dir",
    "read_shard",
    "release_job_lock",
    "shard_done",
    "sample_shards",
    "shard_seed",
    "shard_stats_of_images",
    "shards_for_rank",
    "shutdown_distributed",
    "summarize_stats",
    "write_shard",
]
