#!/usr/bin/python3
"""scripts/ptx_diff.py on a scratch git repository: nvcc only, no GPU.

What it promises: revisions whose kernels compile to the same instructions compare identical even
when nvcc's names and labels move (a comment or a reordering changes the anonymous namespace's hash
and the numbering of branch labels), and a real change to one kernel, or a kernel added, is
reported by name with exit status 1.
"""
import os
import subprocess
import sys
import tempfile
import unittest

SOURCE_DIR = os.environ.get("SHARDSERVE_SOURCE_DIR",
                            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(SOURCE_DIR, "scripts", "ptx_diff.py")

SCALE = """
namespace {
__global__ void scale(float* x, int n, float s) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = x[i] > 0.0f ? x[i] * s : 0.0f;
}
}  // namespace
"""
CLAMP = """
namespace {
// A function-local __shared__ variable: its PTX name carries the file's internal hash.
__device__ __forceinline__ int any_over(const float* x, int n) {
  __shared__ int found;
  if (threadIdx.x == 0) found = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (x[i] > 1.0f) found = 1;
  }
  __syncthreads();
  return found;
}
__global__ void clamp(float* x, int n) {
  if (!any_over(x, n)) return;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (x[i] > 1.0f) x[i] = 1.0f;
  }
}
}  // namespace
"""
LAUNCH = """
void run(float* x, int n) {
  scale<<<1, 32>>>(x, n, 2.0f);
  clamp<<<1, 32>>>(x, n);
}
"""
ADD = """
namespace {
__global__ void add(float* x, int n) {
  if (threadIdx.x < n) x[threadIdx.x] += 1.0f;
}
}  // namespace
void run_add(float* x, int n) { add<<<1, 32>>>(x, n); }
"""


class PtxDiffTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.repo = cls.tmp.name
        cls.git("init", "-q")
        cls.git("config", "user.email", "test@example.com")
        cls.git("config", "user.name", "test")
        os.makedirs(os.path.join(cls.repo, "kernels"))
        # base: two kernels; moved: a comment more and the kernels in the other order (the
        # anonymous namespace's hash and the label numbers change, the instructions do not);
        # changed: one kernel's arithmetic differs; added: one kernel more.
        cls.commit("base", SCALE + CLAMP + LAUNCH)
        cls.commit("moved", "// the same kernels, reordered\n" + CLAMP + SCALE + LAUNCH)
        cls.commit("changed", CLAMP + SCALE.replace("x[i] * s", "x[i] * s + 1.0f") + LAUNCH)
        cls.commit("added", SCALE + CLAMP + LAUNCH + ADD)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def git(cls, *args):
        subprocess.run(["git", "-C", cls.repo, *args], check=True, capture_output=True)

    @classmethod
    def commit(cls, tag, text):
        with open(os.path.join(cls.repo, "kernels", "k.cu"), "w") as f:
            f.write(text)
        cls.git("add", "-A")
        cls.git("commit", "-q", "-m", tag)
        cls.git("tag", tag)

    def diff(self, a, b):
        done = subprocess.run([sys.executable, SCRIPT, a, b, "kernels/k.cu", "--arch", "80"], cwd=self.repo,
                              capture_output=True, text=True, timeout=240)
        self.assertNotIn("failed", done.stderr)
        return done.returncode, done.stdout

    def test_moved_names_and_labels_compare_identical(self):
        # Without the normalisation the two would differ: check that they really do in the raw PTX.
        raw = []
        for tag in ("base", "moved"):
            self.git("checkout", "-q", tag)
            out = os.path.join(self.repo, f"{tag}.ptx")
            subprocess.run([os.environ.get("NVCC", "nvcc"), "-ptx", "-arch=sm_80", "kernels/k.cu", "-o", out],
                           cwd=self.repo, check=True, capture_output=True)
            with open(out) as f:
                raw.append(f.read())
            os.remove(out)
        self.git("checkout", "-q", "added")
        self.assertNotEqual(raw[0], raw[1])
        rc, out = self.diff("base", "moved")
        self.assertEqual(rc, 0, out)
        self.assertIn("sm_80 kernels/k.cu: 2 identical, 0 differ, 0 only in base, 0 only in moved", out)

    def test_a_changed_kernel_is_named(self):
        rc, out = self.diff("base", "changed")
        self.assertEqual(rc, 1, out)
        self.assertIn("1 identical, 1 differ", out)
        differs = [line for line in out.splitlines() if line.strip().startswith("differs:")]
        self.assertEqual(len(differs), 1, out)
        self.assertIn("scale", differs[0])

    def test_an_added_kernel_is_reported(self):
        rc, out = self.diff("base", "added")
        self.assertEqual(rc, 1, out)
        self.assertIn("2 identical, 0 differ, 0 only in base, 1 only in added", out)
        self.assertRegex(out, r"only in added: \S*add")


if __name__ == "__main__":
    unittest.main()
