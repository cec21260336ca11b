"""`omni convert omnimamba` on a checkpoint of the release's size: wall time and peak memory.

Writes random files in the released layouts (tests/omnimamba_files.py: OmniMamba-1.3B's 1,612.8M fp16 tensors with
the untied head copies, a 50277-token tokenizer.json, LlamaGen VQ-16, DINOv2 ViT-L/14-reg4 at 518 px and SigLIP
SO400M/14 in open_clip's names), then converts them in a child process and reports its time and peak resident
memory (the child's ru_maxrss) against the checkpoint's size; then loads the result and checks a few tensors.
Writing runs in a child process too, so the measuring process stays small (a child's ru_maxrss counts the pages
it shares with its parent until it execs). The files are written to --work (a temporary folder by default) and
removed afterwards unless --keep.

Run: python benchmarks/bench_convert.py [--dims release|tiny] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from omnimamba_files import P, Dims, write_all  # noqa: E402

GiB = 2**30


def child_peak(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak resident bytes (ru_maxrss) and exit status of ``cmd`` run as its own process."""
    t = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - t, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def convert_in_child(files, out: Path) -> tuple[float, int, int]:
    """Wall seconds, peak resident bytes and exit status of ``omni convert omnimamba`` run as its own process."""
    cmd = [sys.executable, "-m", "omnicore.cli", "convert", "omnimamba", "--checkpoint", str(files.checkpoint),
           "--tokenizer", str(files.tokenizer), "--vq", str(files.vq), "--dino", str(files.dino),
           "--siglip", str(files.siglip), "--out", str(out)]
    if files.dims.parts == "tiny":
        cmd += ["--vision-size", "tiny"]
    return child_peak(cmd)


def _files(directory: Path, dims: Dims):
    """Where write_all put each file (it ran in the writing child)."""
    from omnimamba_files import OfficialFiles

    return OfficialFiles(dims, directory / f"OmniMamba-{dims.parts}.pth", directory / "tokenizer" / "tokenizer.json",
                         directory / "vq_ds16_t2i.pt", directory / "dinov2.safetensors",
                         directory / "open_clip_pytorch_model.bin", state={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", choices=["release", "tiny"], default="release")
    ap.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the written and converted files")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # the writing child
    args = ap.parse_args()
    dims = Dims.release() if args.dims == "release" else Dims()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.write_only:
        write_all(work / "release", dims)
        return
    try:
        wrote, _, code = child_peak([sys.executable, __file__, "--dims", args.dims, "--work", str(work), "--write-only"])
        if code != 0:
            raise SystemExit(f"writing the release-layout files failed (exit {code})")
        files = _files(work / "release", dims)
        expected = torch.load(files.checkpoint, weights_only=True, mmap=True)
        size = files.checkpoint.stat().st_size
        print(f"wrote the release-layout files in {wrote:.1f} s: checkpoint {size / GiB:.2f} GiB", flush=True)

        _, base, _ = child_peak([sys.executable, "-c", "import torch, timm, omnicore.cli.main"])
        seconds, peak, code = convert_in_child(files, work / "converted")
        if code != 0:
            raise SystemExit(f"omni convert omnimamba failed (exit {code})")
        out_bytes = sum(f.stat().st_size for f in (work / "converted").iterdir() if f.is_file())

        import omnicore

        t = time.perf_counter()
        model = omnicore.load(work / "converted")
        loaded = time.perf_counter() - t
        state = model.state_dict()
        same = torch.equal(state["heads.text.embedding.weight"], expected[P + "embedding.weight"].float()) and \
            torch.equal(state["backbone.layers.0.mixer.in_proj.base_layer.weight"],
                        expected[P + "layers.0.mixer.in_proj.weight"].float())
        params = sum(p.numel() for p in model.parameters())

        print(f"\nomni convert omnimamba, {args.dims} dims ({date.today()}, {platform.node() or 'this machine'}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__})")
        print(f"{'checkpoint':26s} {size / GiB:8.2f} GiB")
        print(f"{'model directory written':26s} {out_bytes / GiB:8.2f} GiB ({params / 1e6:.1f}M parameters in all)")
        print(f"{'convert wall time':26s} {seconds:8.1f} s")
        print(f"{'convert peak memory (RSS)':26s} {peak / GiB:8.2f} GiB = {peak / size:.2f}x the checkpoint")
        print(f"{'  of which imports':26s} {base / GiB:8.2f} GiB (a process that only imports torch, timm, omnicore); "
              f"the rest {(peak - base) / GiB:.2f} GiB = {(peak - base) / size:.2f}x the checkpoint")
        print(f"{'omnicore.load':26s} {loaded:8.1f} s; weights as in the file: {same}")
        if not same:
            raise SystemExit("converted weights differ from the checkpoint's")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
