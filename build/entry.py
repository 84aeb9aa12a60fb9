"""The frozen executable's entry point: the same `outpost` command line as the package's.

A frozen build carries the NVIDIA Python packages its build host had (none, for a release
made by build/release.sh). It also finds them on the device: in /opt/outpost/site-packages,
or in the folders of $OUTPOST_SITE_PACKAGES, searched after its own modules, so only what
the build lacks (tensorrt, cuda.bindings, pycuda, built for Python 3.11) comes from there.
"""

import os
import sys

DEVICE_SITE_PACKAGES = "/opt/outpost/site-packages"

if getattr(sys, "frozen", False):
    for folder in os.environ.get("OUTPOST_SITE_PACKAGES", DEVICE_SITE_PACKAGES).split(":"):
        if folder and os.path.isdir(folder):
            sys.path.append(folder)

from appliance.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
