"""The CUDA part compiles for the oldest architecture of its default list (issue 17): below
sm_80 the tensor-core loops are compiled out (mma.h has no bf16 fragments there) and the SIMT
loops remain, so a T4 / RTX 20xx gets a binary too. Front end only (unoptimised PTX, no ptxas:
the sm_90 build with register checks is test_persistent_spikgru2plus.py's); every default
architecture was compiled with nvcc 13.0 once by hand (docs/install.md)."""

import shutil
import subprocess
import sys

import pytest

from neurokern import _toolchain
from test_persistent_spikgru2plus import _nvcc_command


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux build flags")
def test_cuda_source_compiles_for_the_oldest_default_architecture(tmp_path):
    oldest = _toolchain.default_cuda_archs(_toolchain.nvcc_archs(shutil.which("nvcc")))
    oldest = oldest.split(";")[0].replace(".", "")
    assert int(oldest) < 80  # below the tensor cores' sm_80: the case this test is for
    command = [f"-arch=compute_{oldest}" if a == "-arch=sm_90" else a
               for a in _nvcc_command(tmp_path) if a not in ("-Xptxas", "-v")]
    command += ["-Xcicc", "-O0"]  # the front end is what fails; optimising the PTX costs ~1/3
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
