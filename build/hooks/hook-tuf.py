"""python-tuf: the device updater uses the ngclient and the metadata API."""

from PyInstaller.utils.hooks import collect_submodules

hiddenimports = collect_submodules("tuf.ngclient") + collect_submodules("tuf.api")
