"""Link arguments for C++ extensions built against the installed torch: used by setup.py (which
loads this file by its path, before the package is built) and by the tests that compile an
extension of their own with torch.utils.cpp_extension.load. Imports nothing but the standard
library."""

import os
import shlex
import subprocess


def shared_libstdcxx_link_args(cxx: str) -> list:
    """`[]` where the C++ compiler `cxx` (a command line, as CXX holds it) links the shared
    libstdc++ itself; otherwise `[path]` of the libstdc++.so.6 this process has loaded (torch's),
    to be put on the extension's link line.

    A g++ whose library folders hold libstdc++.a but no libstdc++.so (a relocated toolchain: the
    GPU machines' CXX=/opt/gcc/bin/g++ is one) links a private copy of libstdc++ into the
    extension, and its exported std:: symbols mix with those of torch's shared libstdc++: the
    first TORCH_CHECK message that formatted a number then crashed the process (segmentation
    fault in std::ostringstream) instead of raising. Naming torch's libstdc++.so.6 before the
    driver's own -lstdc++ resolves every std:: symbol from it, so the archive adds nothing."""
    try:
        found = subprocess.run([*shlex.split(cxx), "-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []  # not a GCC-style driver: nothing to check
    if os.path.isabs(found):  # the driver prints the bare name when it finds no such file
        return []
    try:
        with open("/proc/self/maps") as maps:
            fields = (line.split(maxsplit=5) for line in maps)
            loaded = sorted({f[5].strip() for f in fields
                             if len(f) == 6 and "/libstdc++.so" in f[5]})
    except OSError:
        return []
    return loaded[:1]
