"""Compile the CUDA decode kernel for sm_90 on a machine without a GPU and report, per variant,
registers, spills and the instructions of its main loop: the loop a warp runs once per
16-token group, found in the SASS as the innermost backward branch around the HMMAs.

The decode kernel is issue-bound when the loop is long (every instruction the loop saves is a
cycle of a scheduler shared by all resident warps), so this is the cheap check to make before
spending device time. The CUDA 13 compiler, headers and disassembler come from PyPI wheels
(nvidia-cuda-nvcc, -crt, -runtime, -cccl, -cuobjdump, -nvdisasm, nvidia-nvvm), fetched once into
``~/.cache/sawkv/nvcc``:

    python scripts/decode_sass.py                    # default variants
    python scripts/decode_sass.py --variant 4,128,1,1 --dump loop.txt
    python scripts/decode_sass.py --variant 4,128,1,1,1     # per-half key metadata (-kh)

The counts are static: the loop's rarely taken paths (page-table refresh every 32 groups, the
softmax rescale when the running maximum moves) are included; ``--dump`` shows them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "sawkv" / "kernels" / "csrc"
WHEELS = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-cuda-runtime", "nvidia-cuda-cccl",
          "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm", "nvidia-nvvm")  # fmt: skip
DEFAULT = (
    "4,128,1,1",
    "4,128,1,2",
    "8,128,1,1",
    "4,64,1,2",
    "4,256,1,1",
    "4,128,2,1",
    "4,128,1,1,1",
    "8,128,1,1,1",
    "8,128,2,1,1",
)


def toolkit(cache: Path) -> Path:
    """The unpacked CUDA 13 toolkit root (``.../nvidia/cu13``), fetched on first use."""
    root = cache / "nvidia" / "cu13"
    if all((root / "bin" / exe).exists() for exe in ("nvcc", "cuobjdump", "nvdisasm")):
        return root
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", tmp, *WHEELS], check=True)  # fmt: skip
        for whl in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                z.extractall(cache)
    for exe in (root / "bin").iterdir():
        exe.chmod(0o755)
    for exe in (root / "nvvm" / "bin").iterdir():
        exe.chmod(0o755)
    return root


def main_loop(sass: str) -> list[str]:
    """Instructions of the innermost backward-branch loop that contains an HMMA."""
    rows = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2)))
    addr = [a for a, _ in rows]
    best = None
    for k, (a, ins) in enumerate(rows):
        m = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in addr:
            s = addr.index(int(m.group(1), 16))
            if any("HMMA" in i for _, i in rows[s : k + 1]) and (
                best is None or k + 1 - s < best[1] - best[0]
            ):
                best = (s, k + 1)
    return [f"{a:#06x} {i}" for a, i in rows[best[0] : best[1]]] if best else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", help="BITS,D,NT,U[,KH] (repeatable)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sawkv" / "nvcc")
    ap.add_argument("--dump", type=Path, help="write the first variant's main loop here")
    args = ap.parse_args()
    variants = [(tuple(int(x) for x in v.split(",")) + (0,))[:5] for v in (args.variant or DEFAULT)]
    tk = toolkit(args.cache)
    env = dict(os.environ, PATH=f"{tk / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "variants.cu"
        src.write_text('#include "paged_decode.cuh"\n' + "".join(
            f"template __global__ void sawkv::paged_decode_kernel<{b},{d},{nt},{u},{bool(kh)}>"
            "(const sawkv::DecodeParams);\n".replace("True", "true").replace("False", "false")
            for b, d, nt, u, kh in variants))  # fmt: skip
        cubin = Path(tmp) / "variants.cubin"
        res = subprocess.run(
            ["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v",
             "-I", str(CSRC), "-I", str(tk / "include"), str(src), "-o", str(cubin)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if res.returncode:
            sys.exit(res.stderr)
        usage, name = {}, None
        for line in res.stderr.splitlines():
            m = re.search(r"entry function '(\S+)'", line)
            if m:
                name = m.group(1)
            m = re.search(r"Used (\d+) registers", line)
            if m and name:
                usage.setdefault(name, {})["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes spill stores", line)
            if m and name:
                usage.setdefault(name, {})["spill"] = int(m.group(1))
        print(f"{'BITS,D,NT,U,KH':14} {'regs':>5} {'spill B':>8} {'loop instr':>11} {'HMMA':>5}")
        for i, (b, d, nt, u, kh) in enumerate(variants):
            mangled = (f"_ZN5sawkv19paged_decode_kernelILi{b}ELi{d}ELi{nt}ELi{u}ELb{int(bool(kh))}"
                       "EEEvNS_12DecodeParamsE")  # fmt: skip
            sass = subprocess.run(["cuobjdump", "-sass", "-fun", mangled, str(cubin)], env=env,
                                  capture_output=True, text=True, check=True).stdout  # fmt: skip
            loop = main_loop(sass)
            u_ = usage.get(mangled, {})
            name = f"{b},{d},{nt},{u},{int(bool(kh))}"
            print(f"{name:14} {u_.get('regs', '?'):>5} {u_.get('spill', '?'):>8} "
                  f"{len(loop):>11} {sum('HMMA' in x for x in loop):>5}")  # fmt: skip
            if args.dump and i == 0:
                args.dump.write_text("\n".join(loop) + "\n")


if __name__ == "__main__":
    main()
