#!/usr/bin/env python3
"""Do two revisions compile a CUDA file to the same device code? (No GPU needed.)

    scripts/ptx_diff.py REV_A REV_B [FILE.cu ...] [--arch 80,90a]

Compiles each file (default: every kernels/*.cu) at both revisions to PTX for each architecture,
with the flags of kernels/CMakeLists.txt, and compares every kernel's PTX after removing what
differs between two otherwise identical compilations: comments, the hashes nvcc puts in the
names of anonymous namespaces and internal symbols (they follow the source path), and the
numbering of branch labels (it follows the order of the kernels in the file). PTX that is equal
gives the same SASS (ptxas is deterministic), so a refactor that claims "same instructions" can be
checked where no GPU is at hand. Exit status 0 when every kernel of every file is identical, 1
otherwise; kernels that exist on one side only count as different. NVCC names the compiler
(default: nvcc on PATH, else /usr/local/cuda/bin/nvcc).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

NVCC_FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-I."]
_HASHES = [
    (re.compile(r"_GLOBAL__N__[0-9a-f]+_\d+_(\w+?)_cu_[0-9a-f]{8}"), r"_GLOBAL__N__\1"),
    (re.compile(r"_INTERNAL_[0-9a-f]+_\d+_(\w+?)_cu_[0-9a-f]{8}"), r"_INTERNAL_\1"),
    (re.compile(r"\$L__BB\d+_"), "$L__BB_"),
]


def normalise(line):
    for pattern, repl in _HASHES:
        line = pattern.sub(repl, line)
    return line


def kernels(ptx):
    """{kernel name: its normalised PTX lines} for the .entry functions of a PTX text."""
    out, name = {}, None
    for line in ptx.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        line = normalise(line)
        m = re.search(r"\.entry\s+([^\s(]+)", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def compile_rev(repo, rev, files, arch, work):
    src = os.path.join(work, rev.replace("/", "_"))
    if not os.path.isdir(src):
        os.makedirs(src)
        archive = subprocess.run(["git", "-C", repo, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "x", "-C", src], input=archive, check=True)
    result = {}
    for f in files:
        if not os.path.exists(os.path.join(src, f)):
            result[f] = {}
            continue
        ptx = os.path.join(src, f"{os.path.basename(f)}.sm_{arch}.ptx")
        cmd = [nvcc(), *NVCC_FLAGS, "-ptx", f"-arch=sm_{arch}", f, "-o", ptx]
        done = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"ptx_diff: {rev}: {' '.join(cmd)} failed:\n{done.stderr}")
        with open(ptx) as fh:
            result[f] = kernels(fh.read())
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("files", nargs="*", help="CUDA files, relative to the repository root")
    ap.add_argument("--arch", default="80,90a", help="comma-separated SM versions (default 80,90a)")
    args = ap.parse_args()
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                          text=True).stdout.strip()
    files = args.files or sorted(
        os.path.join("kernels", f) for f in os.listdir(os.path.join(repo, "kernels")) if f.endswith(".cu"))
    same = True
    with tempfile.TemporaryDirectory() as work:
        for arch in args.arch.split(","):
            a = compile_rev(repo, args.rev_a, files, arch, work)
            b = compile_rev(repo, args.rev_b, files, arch, work)
            for f in files:
                ka, kb = a[f], b[f]
                identical = sorted(k for k in ka if k in kb and ka[k] == kb[k])
                differ = sorted(k for k in ka if k in kb and ka[k] != kb[k])
                only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
                print(f"sm_{arch} {f}: {len(identical)} identical, {len(differ)} differ, "
                      f"{len(only_a)} only in {args.rev_a}, {len(only_b)} only in {args.rev_b}")
                for label, names in (("differs", differ), (f"only in {args.rev_a}", only_a),
                                     (f"only in {args.rev_b}", only_b)):
                    for k in names:
                        print(f"  {label}: {k}")
                same = same and not (differ or only_a or only_b)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
