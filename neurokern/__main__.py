"""`python -m neurokern`: what this install was built with and which backend runs what."""

import argparse
import platform

import torch

import neurokern
from neurokern import _extension, dispatch
from neurokern.triton_kernels import triton_error


def main():
    parser = argparse.ArgumentParser(prog="python -m neurokern", description=__doc__)
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


if __name__ == "__main__":
    main()
