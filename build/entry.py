"""The frozen executable's entry point: the same `outpost` command line as the package's."""

import sys

from appliance.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
