"""`python -m neurokern`: what this install was built with, which backend runs what, and which
GPU kernel variants are verified, opt-in or unavailable here and why."""

import argparse
import platform
import sys
from typing import Optional

import torch

import neurokern
from neurokern import _extension, dispatch, verified
from neurokern.triton_kernels import triton_error


def main():
    if sys.argv[1:2] in (["record"], ["import-benchmarks"]):  # the record's writer
        sys.exit(verified.main(sys.argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m neurokern", description=__doc__,
        epilog="python -m neurokern record|import-benchmarks --help: the writer of the record "
               "of verified variants (neurokern/verified.py)")
    parser.add_argument("--summary", action="store_true", help="build info only, no table")
    args = parser.parse_args()
    print(f"neurokern {neurokern.__version__}  torch {torch.__version__}  "
          f"python {platform.python_version()}")
    if _extension.error is None:
        print(f"neurokern._C: {_extension.build_info()}")
    else:
        print(f"neurokern._C: not loaded ({_extension.error})")
    print(f"triton: {'not importable: ' + triton_error if triton_error else 'importable'}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    print(f"default backend: {dispatch.default_backend()} (${dispatch.ENV_BACKEND})")
    if args.summary:
        return
    for op, per_device in neurokern.backends().items():
        for device, per_backend in per_device.items():
            for name, status in per_backend.items():
                print(f"  {op:<13} {device:<5} {name:<10} {status}")
    print(f"GPU kernel variants ({verified.TABLE_PATH}; on a GPU auto runs verified ones only, "
          f"{verified.ENV_OPT_IN}=<variant> opts in):")
    for key, word, reason in variant_status():
        print(f"  {word:<12} {key:<44} {reason}")


def variant_status(architecture: Optional[int] = None):
    """`[(key, word, reason)]` for every GPU variant on this machine's first GPU: "verified",
    "opted in", "opt-in", "failed since" (`verified.why`) or "unavailable" (with the record);
    a variant that a setting turns on (`Variant.switch`) is opt-in whatever its record."""
    if architecture is None and torch.cuda.is_available():
        architecture = torch.cuda.get_device_properties(0).major
    rows = []
    for key in verified.all_keys():
        variant = verified.VARIANTS[key.split("/")[0]]
        word, reason = verified.why(key, architecture)
        status = dispatch.availability(variant.ops[0], variant.backend, "cuda")
        if not status.available:
            word, reason = "unavailable", f"{status.reason}; record: {word} {reason}"
        elif architecture is not None and architecture < variant.min_arch:
            word, reason = "unavailable", f"needs sm {variant.min_arch}.0 or newer"
        elif variant.switch:  # never auto's: the setting is the opt-in
            word, reason = "opt-in", f"{variant.switch} turns it on; record: {word} {reason}"
        rows.append((key, word, reason))
    return rows


if __name__ == "__main__":
    main()
