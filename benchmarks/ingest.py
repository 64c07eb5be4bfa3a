"""Ingest speed and memory against the floor of simply reading every input file once.

    python benchmarks/ingest.py                      # 10,000 subjects x 111 genes (the default cohort)
    python benchmarks/ingest.py --subjects 2000 --genes 28
    python benchmarks/ingest.py --compressors        # the store's compressor choice, measured

Prints, from one run on one cohort:
- floor: `pandas.read_csv` of every CSV plus `np.load` of every latent, one process, twice: with
  pandas' defaults, and with one thread. pandas 3.1 parses a large CSV on up to min(CPUs, 6) threads
  by default (option `mode.max_threads`), so its default floor already keeps both cores of a 2-core
  machine busy; the one-thread floor is the one-core reading cost the issue's targets were set
  against ("workers=2 faster than the floor" presumes a floor that uses one core). Ratios against
  both are printed;
- writing the store's bytes to new files, through the page cache and with O_DIRECT (what the
  ingest's writes cost on their own: through the page cache by default, O_DIRECT with --direct-io);
- `ingest` with workers=1 (one process, two threads) and workers=2 (two worker processes), and
  workers=2 with --direct-io: seconds, ratio to the floor, CPU seconds of all its processes, the
  ingest's own phase seconds, peak RSS of the main process and of its largest worker;
- the `genealign ingest --workers 2` command as a user runs it, timed whole (interpreter start and
  imports included, which the floor and the rows above leave out);
- peak RSS of ingest at a second, smaller gene count (--rss_genes, a subset of the same cohort), to
  show memory does not grow with the number of genes.
Every measurement runs in a fresh child process (own RSS, no warm imports). Before each: the inputs
are read into the page cache (the development VM's kernel reclaims cold page cache on its own:
DAMON), memory is touched and freed (`prefault_memory`: on that VM, what a run costs otherwise
depends on how long ago earlier runs freed their memory), and dirty pages are flushed (`sync`), so
runs do not pay for each other's writes. The
"load" column is the 1-minute load average when the kept run started: other jobs on the machine
stretch the seconds (CPU seconds less so), so compare figures from runs at a similar load.
The cohort comes from `pipeline.synth.synthesize` (in-file generator if that is unavailable) and is
kept in --work_dir for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------- cohort
def make_cohort(work_dir: Path, subjects: int, genes: int) -> tuple[Path, Path]:
    cohort = work_dir / f"cohort_{subjects}x{genes}"
    marker = cohort / "complete.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        return Path(meta["gene_embedding_dir"]), Path(meta["brain_latent_dir"])
    started = time.perf_counter()
    try:
        from pipeline.synth import SynthConfig, synthesize

        result = synthesize(SynthConfig(out_dir=cohort, subjects=subjects, genes=genes))
        gene_dir, latent_dir, how = result.gene_embedding_dir, result.brain_latent_dir, "pipeline.synth"
    except Exception as exc:  # synth missing or broken: the benchmark is about ingest, not synth
        print(f"pipeline.synth unavailable ({type(exc).__name__}: {exc}); using the in-file generator")
        gene_dir, latent_dir = _simple_cohort(cohort, subjects, genes)
        how = "in-file generator"
    marker.write_text(json.dumps({"gene_embedding_dir": str(gene_dir), "brain_latent_dir": str(latent_dir)}))
    print(f"generated cohort {cohort} with {how} in {time.perf_counter() - started:.0f}s", flush=True)
    return gene_dir, latent_dir


def _simple_cohort(cohort: Path, subjects: int, genes: int) -> tuple[Path, Path]:
    """Same formats as synth: shuffled rows, 5-decimal values, 7-digit IIDs, float32 latents."""
    import pandas as pd

    rng = np.random.default_rng(0)
    gene_dir, latent_dir = cohort / "gene_embeddings", cohort / "brain_latent"
    gene_dir.mkdir(parents=True, exist_ok=True)
    latent_dir.mkdir(parents=True, exist_ok=True)
    iids = np.array([str(i) for i in rng.choice(np.arange(1_000_000, 6_000_000), subjects, replace=False)])
    for g in range(genes):
        frame = pd.DataFrame(rng.normal(size=(subjects, 256)).astype(np.float32),
                             columns=[f"emb_{j}" for j in range(256)])
        frame.insert(0, "IID", iids)
        frame.iloc[rng.permutation(subjects)].to_csv(
            gene_dir / f"GENE{g:03d}_brain_gene_embeddingUKB.csv", index=False, float_format="%.5f"
        )
    for iid in iids:
        np.savez(latent_dir / f"{iid}_latent.npz", latent=rng.normal(size=(3, 15, 18, 15)).astype(np.float32))
    return gene_dir, latent_dir


# ------------------------------------------------------------------------------------------ children
def child_floor(args: dict) -> dict:
    import pandas as pd

    if args.get("threads"):
        pd.set_option("mode.max_threads", args["threads"])
    gene_dir, latent_dir = Path(args["gene_dir"]), Path(args["latent_dir"])
    names = args["genes"]
    started = time.perf_counter()
    rows = 0
    for name in names:
        rows += len(pd.read_csv(gene_dir / f"{name}_brain_gene_embeddingUKB.csv"))
    for entry in os.scandir(latent_dir):
        if entry.name.endswith("_latent.npz"):
            with np.load(entry.path) as npz:
                npz["latent"]
    return {"seconds": time.perf_counter() - started, "rows": rows}


def child_write_floor(args: dict) -> dict:
    """Writing the store's bytes as new 8 MiB files: what any ingest pays on top of reading. Through
    the page cache the bytes are written twice: the second pass, right after deleting the first, shows
    what the same bytes cost in pages the kernel has just freed. On a VM whose hypervisor backs guest
    memory lazily (virtio-balloon free-page reporting) the two differ ~10x: the first pass pays for
    the host backing every page. The CPU seconds printed for this row cover both passes. With
    "direct": once, with O_DIRECT as the ingest writes (`pipeline.direct_io`), no page cache."""
    from pipeline.direct_io import aligned_empty, probe_alignment, write_file

    target = Path(args["store"] + ".writefloor")
    target.mkdir(parents=True, exist_ok=True)
    align = probe_alignment(target) if args.get("direct") else 0
    block = aligned_empty(((8 << 20) // 4,), np.float32)
    block[:] = np.random.default_rng(0).normal(size=block.shape)
    seconds = []
    for _ in range(1 if args.get("direct") else 2):
        target.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for i in range(-(-args["bytes"] // block.nbytes)):
            write_file(target / str(i), block, align)
        seconds.append(time.perf_counter() - started)
        shutil.rmtree(target)
    if args.get("direct"):
        return {"seconds": seconds[0], "phases": {"O_DIRECT alignment": align}}
    return {"seconds": seconds[0], "phases": {"rewrite in just-freed pages": round(seconds[1], 2)}}


def prefault_memory(gib: float) -> None:
    """Touch `gib` GiB of fresh memory and free it again. On a VM whose hypervisor backs guest memory
    lazily and takes back what the guest frees (the development VM: Firecracker, virtio-balloon
    free-page reporting), the first touch of a page costs ~2.7 s/GiB of CPU, and how many pages a run
    finds already backed depends on what ran before it. Touching enough memory before every run puts
    each in the state of any bare-metal machine, whose memory is always backed. --no_prefault shows
    the other state."""
    if gib > 0:  # in a child: Linux keeps a process's peak RSS across exec, and the runs report theirs
        subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({int(gib * (1 << 30)) // 8})"], check=True)


def child_ingest(args: dict) -> dict:
    import pandas  # noqa: F401  imported before the clock starts, as in child_floor

    from pipeline.ingest import IngestConfig, ingest

    started = time.perf_counter()
    result = ingest(
        IngestConfig(
            gene_embedding_dir=args["gene_dir"], brain_latent_dir=args["latent_dir"], store=args["store"],
            workers=args["workers"], genes=tuple(args["genes"]), overwrite=True, dtype=args.get("dtype", "float32"),
            direct_io=args.get("direct_io", False),
        )
    )
    return {
        "seconds": time.perf_counter() - started,
        "n_kept": result.n_kept,
        "phases": {k: round(v, 2) for k, v in result.phase_seconds.items()},
    }


def child_main(kind: str, payload: str) -> None:
    args = json.loads(payload)
    out = {"floor": child_floor, "ingest": child_ingest, "write_floor": child_write_floor}[kind](args)
    self_usage, child_usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in (self_usage, child_usage))
    out["rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_workers_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def run_cli(args: dict) -> dict:
    """`genealign ingest` as a user runs it: the whole command, interpreter start and imports
    included. Its worker processes re-import the console script (spawn does), so this is the row
    that shows what importing the CLI costs each of them."""
    script = Path(sys.executable).with_name("genealign")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "alignment.cli"]
    command += ["ingest", "--gene_embedding_dir", args["gene_dir"], "--brain_latent_dir", args["latent_dir"],
                "--store", args["store"], "--workers", str(args["workers"]), "--genes", ",".join(args["genes"])]
    os.sync()
    load = os.getloadavg()[0]
    before = os.times()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"genealign ingest failed:\n{proc.stdout}\n{proc.stderr}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"seconds": seconds, "cpu_seconds": cpu, "load": load, "rss_self_mib": None, "rss_workers_mib": 0}


def run_child(kind: str, args: dict) -> dict:
    if kind == "cli":
        return run_cli(args)
    os.sync()  # earlier runs' dirty pages must not be flushed on this run's time
    load = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "load": load}


def warm_cache(gene_dir: Path, latent_dir: Path) -> None:
    for directory in (gene_dir, latent_dir):
        for entry in os.scandir(directory):
            with open(entry.path, "rb") as fh:
                while fh.read(16 << 20):
                    pass


# ------------------------------------------------------------------------------------- compressors
def measure_compressors(work_dir: Path, subjects: int, genes: int) -> None:
    """Write and read back a store's two big arrays with each candidate compressor."""
    import zarr
    from zarr.codecs import BloscCodec

    from pipeline.store import create_store_arrays

    latent_shape, dim = (3, 15, 18, 15), 256
    candidates = {
        "none": None,
        "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        "blosc-zstd1": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
        "blosc-zstd5": BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
    }
    probe = create_store_arrays(work_dir / "probe.zarr", subjects, latent_shape, genes, dim)
    c = probe["genes"].chunks[0]
    shutil.rmtree(work_dir / "probe.zarr")
    genes_block, neuro_block, source = _sample_blocks(work_dir, c, genes, latent_shape, dim)
    n_bytes = subjects * (genes * dim + int(np.prod(latent_shape))) * 4
    print(f"\ncompressors: {subjects} subjects x {genes} genes x {dim} + latents {latent_shape}, float32, "
          f"chunks of {c} subjects, {n_bytes / 2**30:.2f} GiB raw; values from {source}")
    print(f"{'compressor':<12} {'write GB/s':>10} {'read GB/s':>10} {'size ratio':>10}")
    for name, codec in candidates.items():
        path = work_dir / f"compress_{name}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
        group = create_store_arrays(path, subjects, latent_shape, genes, dim, compressors=codec)
        started = time.perf_counter()
        for lo in range(0, subjects, c):
            hi = min(subjects, lo + c)
            group["genes"][lo:hi] = genes_block[: hi - lo]
            group["neuro"][lo:hi] = neuro_block[: hi - lo]
        write_s = time.perf_counter() - started
        reader = zarr.open_group(str(path), mode="r")
        started = time.perf_counter()
        for lo in range(0, subjects, c):
            np.asarray(reader["genes"][lo:lo + c])
            np.asarray(reader["neuro"][lo:lo + c])
        read_s = time.perf_counter() - started
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        print(f"{name:<12} {n_bytes / write_s / 1e9:>10.2f} {n_bytes / read_s / 1e9:>10.2f} {n_bytes / size:>10.3f}")
        shutil.rmtree(path)
    for leftover in ("compress_cohort", "compress_src.zarr"):
        shutil.rmtree(work_dir / leftover, ignore_errors=True)


def _sample_blocks(work_dir: Path, c: int, genes: int, latent_shape, dim: int):
    """One chunk of realistic values: a small synth cohort ingested (5-decimal CSV text, smooth
    latents); Gaussian noise when synth is unavailable."""
    try:
        from pipeline import open_store
        from pipeline.ingest import IngestConfig, ingest
        from pipeline.synth import SynthConfig, synthesize

        cohort = synthesize(SynthConfig(out_dir=work_dir / "compress_cohort", subjects=2 * c, genes=genes))
        store = ingest(IngestConfig(cohort.gene_embedding_dir, cohort.brain_latent_dir, work_dir / "compress_src.zarr",
                                    overwrite=True)).store
        neuro, genes_rows = open_store(store).read_rows(np.arange(c))
        return genes_rows, neuro.reshape(c, *latent_shape), "a pipeline.synth cohort"
    except Exception:  # synth missing or broken
        rng = np.random.default_rng(0)
        genes_rows = np.round(rng.normal(size=(c, genes, dim)), 5).astype(np.float32)  # (c, G, D)
        return genes_rows, rng.normal(size=(c, *latent_shape)).astype(np.float32), "Gaussian noise"


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=111)
    parser.add_argument("--rss_genes", type=int, default=28, help="second gene count for the RSS comparison")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each timing is the best of them")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/genealign_bench_ingest"))
    parser.add_argument("--compressors", action="store_true", help="only measure the compressor choice")
    parser.add_argument("--prefault_gib", type=float, default=4.0,
                        help="GiB of memory touched and freed before every run (see prefault_memory)")
    parser.add_argument("--no_prefault", action="store_true", help="measure in whatever memory state runs leave")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.compressors:
        measure_compressors(args.work_dir, min(args.subjects, 2000), args.genes)
        return

    from pipeline.ingest import get_all_gene_names

    gene_dir, latent_dir = make_cohort(args.work_dir, args.subjects, args.genes)
    all_genes = get_all_gene_names(gene_dir)
    store = str(args.work_dir / "bench.zarr")
    warm_cache(gene_dir, latent_dir)
    n_latents = sum(1 for _ in os.scandir(latent_dir))
    print(f"cohort: {args.subjects} subjects, {len(all_genes)} gene CSVs, {n_latents} latent files; "
          f"{os.cpu_count()} CPUs; best of {args.repeat}; memory prefaulted before each run: "
          f"{'no' if args.no_prefault else f'{args.prefault_gib:g} GiB'}", flush=True)

    # Every configuration once per round, rounds repeated, best of each kept: the machine's load
    # drifts, and interleaving exposes every configuration to the same drift.
    configs = []
    for n_genes in (len(all_genes), min(args.rss_genes, len(all_genes))):
        common = {"gene_dir": str(gene_dir), "latent_dir": str(latent_dir), "genes": all_genes[:n_genes]}
        store_bytes = args.subjects * (n_genes * 256 + 3 * 15 * 18 * 15) * 4
        configs.append((f"floor ({n_genes} genes)", "floor", common, n_genes))
        configs.append((f"floor 1 thread ({n_genes} genes)", "floor", {**common, "threads": 1}, n_genes))
        configs.append((f"write {store_bytes / 2**30:.2f} GiB new files", "write_floor",
                        {"store": store, "bytes": store_bytes}, n_genes))
        configs.append((f"write {store_bytes / 2**30:.2f} GiB O_DIRECT", "write_floor",
                        {"store": store, "bytes": store_bytes, "direct": True}, n_genes))
        for workers in (1, 2) if n_genes == len(all_genes) else (1,):
            configs.append((f"ingest workers={workers} ({n_genes} genes)", "ingest",
                            {**common, "store": store, "workers": workers}, n_genes))
        if n_genes == len(all_genes):
            configs.append((f"ingest workers=2 O_DIRECT ({n_genes})", "ingest",
                            {**common, "store": store, "workers": 2, "direct_io": True}, n_genes))
            configs.append(("`genealign ingest` w=2, whole", "cli", {**common, "store": store, "workers": 2}, n_genes))
    results: dict[str, dict] = {}
    for _ in range(args.repeat):
        for label, kind, payload, _ in configs:
            shutil.rmtree(store, ignore_errors=True)  # replacing an old store is not what we time
            warm_cache(gene_dir, latent_dir)
            prefault_memory(0 if args.no_prefault else args.prefault_gib)
            result = run_child(kind, payload)
            if label not in results or result["seconds"] < results[label]["seconds"]:
                results[label] = result
    shutil.rmtree(store, ignore_errors=True)
    floors = {(n, bool(payload.get("threads"))): results[label]["seconds"]
              for label, kind, payload, n in configs if kind == "floor"}
    rows = [(label, results[label], floors[n, False], floors[n, True]) for label, _, _, n in configs]

    print(f"\n{'run':<32} {'seconds':>8} {'x floor':>8} {'x floor 1t':>10} {'CPU s':>7} {'load':>5} "
          f"{'RSS main MiB':>13} {'RSS worker MiB':>15}  phases")
    for label, result, floor_s, floor1_s in rows:
        workers_rss = f"{result['rss_workers_mib']:.0f}" if "workers=2" in label else "-"
        main_rss = "-" if result["rss_self_mib"] is None else f"{result['rss_self_mib']:.0f}"
        print(
            f"{label:<32} {result['seconds']:>8.2f} {result['seconds'] / floor_s:>8.2f} "
            f"{result['seconds'] / floor1_s:>10.2f} {result['cpu_seconds']:>7.1f} "
            f"{result['load']:>5.1f} {main_rss:>13} {workers_rss:>15}  {result.get('phases', '')}"
        )
    rss = {n: results[label]["rss_self_mib"] for label, kind, payload, n in configs
           if kind == "ingest" and payload["workers"] == 1}
    print("peak RSS of ingest workers=1: " + ", ".join(f"{v:.0f} MiB at {n} genes" for n, v in rss.items()))


if __name__ == "__main__":
    main()
